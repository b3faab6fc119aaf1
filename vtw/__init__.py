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
from .reducers import REDUCERS, RandomTokens, withdraw_vision
from .withdraw import WithdrawalHandle, validate_layer, withdraw

__all__ = [
    "SUPPORTED_FAMILIES",
    "REDUCERS",
    "FamilySpec",
    "RandomTokens",
    "WithdrawalHandle",
    "get_family",
    "language_model",
    "num_decoder_layers",
    "text_config",
    "validate_layer",
    "vision_token_mask",
    "withdraw",
    "withdraw_vision",
]
__version__ = "0.1.0"
