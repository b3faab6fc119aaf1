"""Loading options the method layer supports, in one place (config validation and the lmms-eval model ask here)."""

from __future__ import annotations

import torch

from .withdraw import SUPPORTED_ATTENTION, check_attention

#: ``model.dtype`` / the lmms-eval ``dtype=`` model arg: ``auto`` (bfloat16 on CUDA, float32 on CPU) or one of these
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


_NONE = ("none", "null", "", "~")
#: named ``device_map`` strategies of ``from_pretrained`` (accelerate's); a dict ``{module: device}`` is allowed too
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(device_map, max_memory) -> tuple[str | dict | None, dict | None]:
    """``device_map`` / ``max_memory`` model args → what ``from_pretrained`` takes.

    ``device_map``: ``None``/``none``/``null``, one of :data:`DEVICE_MAPS`, or a dict ``{module: device}``.
    ``max_memory``: ``None``, a dict, or ``"0:20GiB;1:20GiB;cpu:64GiB"`` (``;`` between items: lmms-eval splits
    model args on ``,``); GPU indices become ints. ``ValueError`` otherwise, or for ``max_memory`` without a map.
    """
    if isinstance(device_map, str):
        device_map = None if device_map.strip().lower() in _NONE else device_map.strip()
    if device_map is not None and not isinstance(device_map, dict) and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {DEVICE_MAPS}, a dict or None, got {device_map!r}")
    if isinstance(max_memory, str):
        text = max_memory.strip()
        if text.lower() in _NONE:
            max_memory = None
        else:
            try:
                max_memory = dict(item.split(":", 1) for item in text.replace(",", ";").split(";") if item.strip())
            except ValueError:
                raise ValueError(
                    f"max_memory={text!r} must be 'device:size' items separated by ';' (e.g. 0:20GiB;1:20GiB;cpu:64GiB)"
                ) from None
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise ValueError(f"max_memory must be a dict of device -> size, got {max_memory!r}")
        if device_map is None:
            raise ValueError(f"max_memory={max_memory!r} needs a device_map (e.g. device_map=auto)")
        max_memory = {int(k) if str(k).strip().isdigit() else str(k).strip(): v for k, v in max_memory.items()}
    return device_map, max_memory


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


__all__ = [
    "DEVICE_MAPS",
    "DTYPES",
    "DTYPE_CHOICES",
    "SUPPORTED_ATTENTION",
    "check_attention",
    "parse_device_map",
    "resolve_dtype",
]
