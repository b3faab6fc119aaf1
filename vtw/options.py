"""Loading options the method layer supports, in one place: :class:`ModelArgs`, the model arguments shared by the
pipeline's ``model`` config group (:class:`vtw.pipeline.schema.ModelConf` extends it) and the lmms-eval model
``vtw`` (its ``--model_args``), each checked once, in :meth:`ModelArgs.check`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

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


def check_choice(value, allowed: Sequence, what: str):
    """``value`` if it is one of ``allowed``, else ``ValueError`` naming it and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
    return value


def check_count(value, what: str, minimum: int | None = None) -> int:
    """An int (not a bool; a numeric string as lmms-eval's model args give it is converted) ``>= minimum``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what}={value!r} must be >= {minimum}")
    return value


def check_text(value, what: str) -> str:
    """A non-empty string, else ``ValueError``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}={value!r} must be a non-empty string")
    return value


@dataclass
class ModelArgs:
    """How a model is loaded and served: the ``model`` config group's shared part and the lmms-eval model's args.

    :meth:`check` validates every value (before any weight loads) and normalises ``device_map`` / ``max_memory``
    (:func:`parse_device_map`) and an empty ``chat_template``; ``prefix`` names the values in its errors
    (``model.`` in the pipeline).
    """

    pretrained: str = "???"  # hub id or local directory (from_pretrained); "???": OmegaConf's MISSING
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    batch_size: int = 1  # requests per forward / generate call (left padding)
    attn_implementation: str = "sdpa"  # sdpa | eager
    max_new_tokens: int = 128  # when a task's generation_kwargs has none
    chat_template: str | None = None  # a Jinja template (string or file) replacing the processor's
    max_frames_num: int = 8  # frames sampled from a video input
    device_map: Any = None  # model parallel in one process: null | auto | balanced | balanced_low_0 | sequential | dict
    max_memory: Any = None  # with device_map: {device: size}, e.g. {0: 20GiB, 1: 20GiB, cpu: 64GiB}
    revision: str | None = None  # passed to from_pretrained
    trust_remote_code: bool = False  # passed to from_pretrained

    def check(self, prefix: str = "") -> ModelArgs:
        """Check and normalise in place (``ValueError`` naming ``<prefix><key>=<value>`` and what is allowed)."""
        check_text(self.pretrained, f"{prefix}pretrained")
        check_choice(self.dtype, DTYPE_CHOICES, f"{prefix}dtype")
        check_choice(self.attn_implementation, SUPPORTED_ATTENTION, f"{prefix}attn_implementation")
        for key in ("batch_size", "max_new_tokens", "max_frames_num"):
            setattr(self, key, check_count(getattr(self, key), f"{prefix}{key}", 1))
        self.chat_template = None if self.chat_template in (None, "") else str(self.chat_template)
        try:
            self.device_map, self.max_memory = parse_device_map(self.device_map, self.max_memory)
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None
        return self

    def hub_kwargs(self) -> dict:
        """``revision`` / ``trust_remote_code`` for every ``from_pretrained`` call (left out when not set)."""
        kw = {"revision": self.revision, "trust_remote_code": bool(self.trust_remote_code)}
        return {k: v for k, v in kw.items() if v is not None}

    @classmethod
    def of(cls, obj) -> ModelArgs:
        """The :class:`ModelArgs` part of ``obj`` (a :class:`vtw.pipeline.schema.ModelConf`, which extends it)."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


__all__ = [
    "ModelArgs",
    "check_choice",
    "check_count",
    "check_text",
    "DEVICE_MAPS",
    "DTYPES",
    "DTYPE_CHOICES",
    "SUPPORTED_ATTENTION",
    "check_attention",
    "parse_device_map",
    "resolve_dtype",
]
