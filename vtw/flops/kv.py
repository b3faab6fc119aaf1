"""KV-cache size of one sample, per decoder layer, vanilla vs VTW.

Each decoder layer caches one key and one value vector of ``kv_heads * head_dim`` elements per token it has seen. After
a ``generate`` call that produced ``G`` tokens the cache holds the prompt and the first ``G - 1`` generated tokens (the
last token is never fed back). Under withdrawal at ``K``, layers ``>= K`` never saw the vision tokens, so they hold
``T + G - 1`` entries instead of ``V + T + G - 1``. Sliding-window caches (Mistral-style ``sliding_window``) are not
modelled: every supported checkpoint keeps the full context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import architecture
from ..methods import Reduction
from ..workload import SampleCounts
from .count import prefill_layer_tokens, resolved_method, sample_layout

_DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
    "int8": 1,
}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a ``torch.dtype`` or one of the names in ``_DTYPE_BYTES``."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        if name in _DTYPE_BYTES:
            return _DTYPE_BYTES[name]
    raise ValueError(f"unknown KV-cache dtype {dtype!r}; allowed: a torch.dtype or one of {sorted(_DTYPE_BYTES)}")


@dataclass(frozen=True)
class KVReport:
    """KV-cache bytes of one sample.

    Attributes:
        per_layer: bytes held by each decoder layer (``L`` entries) with the requested withdrawal layer.
        vanilla_per_layer: the same without withdrawal.
        tokens_per_layer: cached tokens of each layer.
        layer: withdrawal layer ``K`` or ``None``; dtype: the element type's name; bytes_per_element.
    """

    per_layer: tuple[int, ...]
    vanilla_per_layer: tuple[int, ...]
    tokens_per_layer: tuple[int, ...]
    layer: int | None
    dtype: str
    bytes_per_element: int

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    @property
    def vanilla_total(self) -> int:
        return sum(self.vanilla_per_layer)

    @property
    def saved_fraction(self) -> float:
        """1 - total / vanilla_total (0.0 when the cache is empty)."""
        return 1.0 - self.total / self.vanilla_total if self.vanilla_total else 0.0


def kv_cache_bytes(config, sample: SampleCounts, method: Reduction | None = None, *, dtype="bfloat16") -> KVReport:
    """KV-cache bytes after generating ``sample.generated_tokens`` tokens for one sample (see the module docstring).

    Per layer: ``2 (K and V) * kv_heads * head_dim * cached_tokens * bytes_per_element``; a layer caches the prompt
    tokens it processed (``method.layer_tokens``; the full model when no ``method`` is given) plus the generated ones.
    """
    dec = architecture(config).decoder
    sample = sample.checked()
    method, layer = resolved_method(method, dec.num_layers)
    nbytes = dtype_bytes(dtype)
    extra = max(sample.generated_tokens - 1, 0)
    per_token = 2 * dec.kv_heads * dec.head_dim * nbytes
    full = sample.vision_tokens + sample.text_tokens + extra
    layout = sample_layout(config, method, sample)
    prompt = prefill_layer_tokens(dec.num_layers, sample.vision_tokens, sample.text_tokens, method, layout)
    tokens = tuple(n + extra for n in prompt)
    return KVReport(
        per_layer=tuple(per_token * n for n in tokens),
        vanilla_per_layer=tuple(per_token * full for _ in range(dec.num_layers)),
        tokens_per_layer=tokens,
        layer=layer,
        dtype=str(dtype).removeprefix("torch."),
        bytes_per_element=nbytes,
    )
