"""FLOPs and KV-cache accounting for VTW, from a config and per-sample token counts (no weights needed).

Two figures, always labelled:

One sample is described once, by :class:`SampleCounts` (vision, text and generated tokens, the encoder work, the
grids): ``count_flops(config, sample, method)``, ``paper_flops(config, sample, method)`` and
``kv_cache_bytes(config, sample, method)`` all take it (``method``: a :class:`vtw.methods.Reduction`, e.g.
``Withdrawal(layer=16)``; ``None``: the full model).

1. **Exact matmul FLOPs** (:func:`count_flops` -> :class:`FlopsReport`): what the pinned transformers actually
   computes for one sample, one multiply-add = 2 FLOPs, split by phase (prefill / all decode steps) and component:

   * ``vision_tower``: patch-embedding convolution, q/k/v/o projections, attention scores (``Q K^T`` and ``A V``)
     within each attention segment (an image or crop for CLIP/SigLIP, a frame for Qwen2-VL, a window or frame for
     Qwen2.5-VL) and the MLPs of **every** encoder block (transformers runs them all even when
     ``vision_feature_layer=-2`` reads an earlier one). A fixed-resolution encoder runs once per image, anyres crop
     or video frame; a Qwen ViT once over all patches.
   * ``projector``: LLaVA's two-layer ``multi_modal_projector`` over every encoder output it receives (all anyres
     crops before unpadding; pooled frames for LLaVA-NeXT-Video), or Qwen's patch-merger MLP.
   * ``decoder_attention_proj`` (q, k, v, o with grouped KV heads), ``decoder_attention_scores`` (``Q K^T`` and
     ``A V`` over every query/key pair, the causally masked half included: SDPA with a mask computes it, and
     FlopCounterMode counts it), ``decoder_mlp`` (gate, up, down).
   * ``lm_head``: only positions whose logits are computed: ``generate`` keeps the last prefill position
     (``logits_to_keep=1``) and one per decode step (``prefill_logits`` changes the prefill count).

   Prefill: layers ``< K`` process ``V + T`` tokens, layers ``>= K`` the ``T`` text tokens. Decode step ``j``
   (``j = 1 .. G-1``; the prefill yields the first of ``G`` generated tokens) runs one token through every layer; it
   attends over ``V + T + j`` keys in layers ``< K`` and ``T + j`` keys in layers ``>= K``.

   Not counted, on either side (``torch.utils.flop_counter.FlopCounterMode`` counts matmul-like aten ops only: mm,
   addmm, bmm, baddbmm, convolution, scaled-dot-product attention): norms, softmax, activations, gating products,
   residual adds, bias additions, RoPE (its frequency table is a broadcast multiply in transformers 5.23, its
   rotation element-wise), embedding lookups, pooling/interpolation, the anyres repacking, sampling. Nothing
   matmul-like is left out here, so at the pinned transformers this count equals FlopCounterMode's for a
   ``generate`` call, component by component (``tests/test_flops.py`` asserts equality for every family, prefill
   and decode, with and without withdrawal).

2. **The papers' convention** (:func:`paper_flops`): FastV's ``4nd^2 + 2n^2d + 2ndm`` per decoder layer, prefill
   only, one multiply-add = one operation; see :mod:`vtw.flops.paper` for exactly what it covers and leaves out.

Also: :func:`kv_cache_bytes` (KV-cache bytes per layer, vanilla vs VTW), :func:`image_layout` (tokens and encoder work
of one image of a given size), :func:`workload_from_inputs` (the encoder work of one sample from processor outputs),
:func:`flops_table` / :func:`plan_flops` (a table over every withdrawal layer, offline, for shipped configs).
"""

from ..arch import Architecture, architecture
from ..workload import DEFAULT_IMAGE_SIZE, ImageLayout, SampleCounts, VisionWorkload, image_layout, workload_from_inputs
from .configs import SHIPPED_CHECKPOINTS, available_models, load_model_config
from .count import COMPONENTS, FlopsReport, PhaseFlops, VisionFlops, count_flops
from .kv import KVReport, dtype_bytes, kv_cache_bytes
from .paper import PAPER_CONVENTION, fastv_layer_flops, paper_flops, paper_tflops
from .plan import FlopsRow, PlanResult, flops_table, plan_flops

__all__ = [
    "COMPONENTS",
    "DEFAULT_IMAGE_SIZE",
    "PAPER_CONVENTION",
    "SHIPPED_CHECKPOINTS",
    "Architecture",
    "FlopsReport",
    "FlopsRow",
    "ImageLayout",
    "KVReport",
    "PhaseFlops",
    "PlanResult",
    "SampleCounts",
    "VisionFlops",
    "VisionWorkload",
    "architecture",
    "available_models",
    "count_flops",
    "dtype_bytes",
    "fastv_layer_flops",
    "flops_table",
    "image_layout",
    "kv_cache_bytes",
    "load_model_config",
    "paper_flops",
    "paper_tflops",
    "plan_flops",
    "workload_from_inputs",
]
