"""vtw: Visual Tokens Withdrawal for multimodal LLMs (arXiv 2405.05803).

``from vtw import withdraw`` needs torch and transformers only (no Hydra, lmms-eval or W&B).
"""

from .families import (
    SUPPORTED_FAMILIES,
    FamilySpec,
    get_family,
    language_model,
    num_decoder_layers,
    text_config,
    vision_token_mask,
)
from .methods import METHODS, RandomTokens, Reduction, StageContext, Withdrawal, make_method, method_names
from .withdraw import SUPPORTED_ATTENTION, WithdrawalHandle, validate_layer, withdraw

__all__ = [
    "SUPPORTED_FAMILIES",
    "METHODS",
    "SUPPORTED_ATTENTION",
    "FamilySpec",
    "RandomTokens",
    "Reduction",
    "StageContext",
    "WithdrawalHandle",
    "get_family",
    "language_model",
    "num_decoder_layers",
    "text_config",
    "validate_layer",
    "vision_token_mask",
    "Withdrawal",
    "make_method",
    "method_names",
    "withdraw",
]
__version__ = "0.1.0"
