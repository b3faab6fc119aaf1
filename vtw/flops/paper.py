"""The FLOPs convention of the token-pruning papers (FastV, used for VTW-style comparisons), reproduced exactly.

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764, Sec. 4.2 "Computing Cost
Estimation") estimates one transformer layer processing ``n`` tokens as

    F(n) = 4 n d^2 + 2 n^2 d + 2 n d m

with ``d`` the hidden size and ``m`` the FFN intermediate size, and a model as the sum of ``F`` over its layers, the
layers after the pruning layer using the reduced token count. Reading the terms:

* ``4 n d^2``: the q, k, v and output projections, each ``n * d * d`` multiply-adds (multi-head attention with as
  many key/value heads as query heads: grouped-query attention is not modelled).
* ``2 n^2 d``: ``Q K^T`` and ``A V``, ``n * n * d`` multiply-adds each, over the full ``n x n`` score matrix.
* ``2 n d m``: a two-matrix FFN (``d -> m -> d``), ``n * d * m`` multiply-adds each. LLaMA/Qwen have three matrices
  (gated SiLU), so this term is 2/3 of the real MLP work.
* One multiply-add counts as ONE operation, so the figure is about half of a 2-FLOPs-per-multiply-add count.
* Decoder layers only, prefill only: no vision encoder, no projector, no LM head, no decode steps.

:func:`paper_flops` applies that formula with ``n = V + T`` in layers ``< K`` and ``n = T`` in layers ``>= K`` (VTW
withdraws every vision token). Later papers (PyramidDrop, FitPrune, SparseVLM) write ``3 n d m`` for the gated MLP;
the VTW authors themselves measured with the calflops tool on a real prefill forward (2 FLOPs per multiply-add,
vision tower and every output position's logits included), which corresponds to ``count_flops(...).prefill`` with
``prefill_logits="all"`` plus the non-matmul ops calflops also counts. Print the convention next to any number.
"""

from __future__ import annotations

from ..arch import architecture
from ..methods import Reduction
from ..workload import SampleCounts
from .count import TERA, prefill_layer_tokens, resolved_method, sample_layout

PAPER_CONVENTION = "FastV/VTW papers: sum over decoder layers of 4nd^2 + 2n^2d + 2ndm (prefill; 1 multiply-add = 1)"


def fastv_layer_flops(n: int, d: int, m: int) -> int:
    """``4 n d^2 + 2 n^2 d + 2 n d m``: one layer over ``n`` tokens in the FastV convention."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def paper_flops(config, sample: SampleCounts, method: Reduction | None = None) -> int:
    """Prefill FLOPs of the language decoder in the FastV/VTW papers' convention (see the module docstring).

    Args:
        sample: the sample's counts (:class:`vtw.flops.SampleCounts`): ``V`` vision and ``T`` (>= 1) text tokens,
            and its ``vision_layout`` where a method acting before the decoder needs it (the encoder work and the
            generated tokens are not part of the papers' convention).
        method: the reduction counted (e.g. ``Withdrawal(layer=K)``; ``None``: the full model): each layer's ``n``
            from ``method.layer_tokens`` (the method's scoring work is not part of the papers' convention).

    Returns:
        ``K * F(V + T) + (L - K) * F(T)`` under VTW at ``K`` (``K = L`` without withdrawal), with
        ``F(n) = 4nd^2 + 2n^2d + 2ndm``, an int in the papers' unit (one multiply-add = one operation). Divide by
        ``1e12`` for the papers' "TFLOPs".
    """
    dec = architecture(config).decoder
    sample = sample.checked()
    method, _ = resolved_method(method, dec.num_layers)
    layout = sample_layout(config, method, sample)
    tokens = prefill_layer_tokens(dec.num_layers, sample.vision_tokens, sample.text_tokens, method, layout)
    return sum(fastv_layer_flops(n, dec.hidden, dec.intermediate) for n in tokens)


def paper_tflops(config, sample: SampleCounts, method: Reduction | None = None) -> float:
    """:func:`paper_flops` / 1e12."""
    return paper_flops(config, sample, method) / TERA
