"""Loading options the method layer supports, in one place (config validation and the lmms-eval model ask here)."""

from __future__ import annotations

import torch

from .withdraw import SUPPORTED_ATTENTION, check_attention

#: ``model.dtype`` / the lmms-eval ``dtype=`` model arg: ``auto`` (bfloat16 on CUDA, float32 on CPU) or one of these
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``auto`` (or ``None``) → bfloat16 on CUDA, float32 elsewhere; a name of :data:`DTYPES` or a torch dtype → that
    dtype; anything else a ``ValueError`` naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


__all__ = ["DTYPES", "DTYPE_CHOICES", "SUPPORTED_ATTENTION", "check_attention", "resolve_dtype"]
