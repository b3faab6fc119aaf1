"""vtw.flops: analytic FLOPs against torch's FlopCounterMode, a hand-derived config, shipped configs, bad input.

FlopCounterMode counts matmul-like aten ops only (mm, addmm, bmm, convolution, scaled-dot-product attention); the
analytic model counts exactly those (norms, softmax, activations, RoPE, bias adds, pooling are left out on both
sides), so at the pinned transformers the two agree exactly, component by component. The issue asks for 1%; the
tests assert equality, which also catches off-by-one errors in the decode-step key counts that 1% would hide.

One blind spot of the counter is closed here, not in the analytic model: torch 2.14 counts 0 FLOPs for
``F.scaled_dot_product_attention`` on CPU (it dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which has no formula in its registry). ``flop_counter()`` registers the test's own formula for that op, and
``test_sdpa_formula_equals_eager_attention`` checks the formula against eager attention (plain matmuls, which every
torch counts), so "exact" means the same on every torch the pins allow.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import transformers as T
from rich.console import Console
from tiny_models import FAMILIES, VIDEO_FAMILIES, VIDEO_ID, Sample, build_tiny_model, make_batch, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from vtw import get_family, withdraw
from vtw.flops import (
    SHIPPED_CHECKPOINTS,
    SampleCounts,
    VisionWorkload,
    available_models,
    count_flops,
    flops_table,
    image_layout,
    kv_cache_bytes,
    load_model_config,
    paper_flops,
    plan_flops,
    workload_from_inputs,
)
from vtw.flops.plan import render_flops_table
from vtw.methods import FastV, PyramidDrop, RandomVision, Withdrawal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
NUM_LAYERS = 4


# ----------------------------------------------------------------------------------------------- helpers
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q kᵀ) v for q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): the scores are B·Hq·Sq·Sk dot
    products of length D, the output B·Hq·Sq·Dv sums of Sk products; 2 FLOPs per multiply-add. K/V heads are shared
    by Hq / Hkv query heads (GQA) but every query head does the work; the causal half is not discounted (as torch's
    own GPU formulas)."""
    b, hq, sq, d = query_shape
    sk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * hq * sq * sk * d + 2 * b * hq * sq * sk * dv


# CPU SDPA kernels: counted with the formula above (a torch that counts them itself gets the same formula overridden)
_CPU_SDPA_OPS = [
    op
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if (op := getattr(torch.ops.aten, name, None)) is not None
]


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts CPU scaled-dot-product attention (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping={op: _sdpa_flops for op in _CPU_SDPA_OPS})


def _measure(model, batch: dict, generated: int, layer, method=None) -> dict[str, int]:
    """FlopCounterMode over ``generate`` (greedy, exactly ``generated`` new tokens), split into components; VTW at
    ``layer``, or ``method`` (a method object)."""
    handle = withdraw(model, layer=layer) if method is None else withdraw(model, method=method)
    with torch.no_grad(), handle, flop_counter() as counter:
        model.generate(**batch, max_new_tokens=generated, min_new_tokens=generated, do_sample=False)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top = type(model).__name__
    spec = get_family(model)  # where the registry says the tower and the projector live
    tower = type(spec.module(model, "vision_tower")).__name__
    if spec.projector.startswith(spec.vision_tower + "."):  # Qwen: the merger lives inside the vision model
        projector = counts.get(tower + spec.projector[len(spec.vision_tower) :], 0)
        vision = counts.get(tower, 0) - projector
    else:  # the towers and the projector are called directly, so they are tracked under their class names
        vision = counts.get(tower, 0)
        projector = counts.get(type(spec.module(model, "projector")).__name__, 0)
    out = {
        "vision_tower": vision,
        "projector": projector,
        "decoder": counts.get(f"{top}.model.language_model", 0),
        "lm_head": counts.get(f"{top}.lm_head", 0),
        "total": counter.get_total_flops(),
    }
    assert out["total"] == out["vision_tower"] + out["projector"] + out["decoder"] + out["lm_head"], counts
    return out


def _phase(phase) -> dict[str, int]:
    return {
        "vision_tower": phase.vision_tower,
        "projector": phase.projector,
        "decoder": phase.decoder,
        "lm_head": phase.lm_head,
        "total": phase.total,
    }


def _token_counts(model, input_ids: torch.Tensor) -> tuple[int, int]:
    cfg = model.config
    ids = [cfg.image_token_id] + ([cfg.video_token_id] if getattr(cfg, "video_token_id", None) is not None else [])
    vision = torch.isin(input_ids[0], torch.tensor(ids))
    return int(vision.sum()), int((~vision).sum())


def _workload(model, batch: dict) -> VisionWorkload:
    keys = ("pixel_values", "image_sizes", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
    tensors = {k: batch[k] for k in keys if k in batch}
    image_key = get_family(model).image_key  # Video-LLaVA: pixel_values_images
    if image_key in batch:
        tensors["pixel_values"] = batch[image_key]
    return workload_from_inputs(model.config, **tensors)


def _compare(model, batch: dict, layers=(None, 2, 0), generated: int = 3) -> None:
    """Prefill (generate 1 token) and decode (generate ``generated`` minus generate 1) against the analytic count."""
    v, t = _token_counts(model, batch["input_ids"])
    work = _workload(model, batch)
    for layer in layers:
        one = _measure(model, batch, 1, layer)
        many = _measure(model, batch, generated, layer)
        rep1 = count_flops(model.config, SampleCounts.of(work, v, t, 1), Withdrawal(layer=layer))
        rep = count_flops(model.config, SampleCounts.of(work, v, t, generated), Withdrawal(layer=layer))
        assert _phase(rep1.prefill) == one, (layer, "prefill")
        assert rep.prefill == rep1.prefill and rep1.decode.total == 0
        decode = {k: many[k] - one[k] for k in one}
        assert decode["vision_tower"] == decode["projector"] == 0
        assert _phase(rep.decode) == decode, (layer, "decode")
        assert abs(rep.total - many["total"]) <= 0.01 * many["total"]  # the 1%, implied by the above


def _phase_with_reduction(phase, method=None) -> dict[str, int]:
    """:func:`_phase`, the method's scoring counted where it runs: in the decoder's forward, or for a method acting
    in the vision encoder (``method.acts_in``) in the projector's (its pre-hook decides)."""
    out = _phase(phase)
    out["projector" if getattr(method, "acts_in", None) == "vision_encoder" else "decoder"] += phase.reduction
    return out


PEERS = {
    "fastv": lambda: FastV(layer=2, keep=0.5),
    "fastv-first": lambda: FastV(layer=1, keep=0.25),
    "pdrop": lambda: PyramidDrop(layers=(1, 2, 3), keep=(0.5, 0.25, 0.125)),
    "random_vision": lambda: RandomVision(layer=1, keep=0.3),
}


@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_peer_methods_match_flop_counter_mode(family, peer):
    """Every peer method, every family: prefill (the method's attention scoring included) and decode (on the
    reduced caches) against FlopCounterMode over real generate calls."""
    model = build_tiny_model(family, num_layers=NUM_LAYERS)
    shape = (40, 24) if family.startswith("qwen") else (24, 40)
    sample = Sample(images=1, videos=int(family in VIDEO_FAMILIES), prefix=3, suffix=5, image_shape=shape)
    batch = make_batch(model, [sample])
    v, t = _token_counts(model, batch["input_ids"])
    work = _workload(model, batch)
    method = PEERS[peer]()
    one = _measure(model, batch, 1, None, method)
    many = _measure(model, batch, 3, None, method)
    rep = count_flops(model.config, SampleCounts.of(work, v, t, 3), method)
    assert _phase_with_reduction(rep.prefill) == one
    assert (rep.prefill.reduction > 0) == (peer != "random_vision")
    assert _phase(rep.decode) == {k: many[k] - one[k] for k in one}
    vtw_like = count_flops(model.config, SampleCounts.of(work, v, t, 3), Withdrawal(layer=2))
    assert rep.total != vtw_like.total  # the method's own token counts, not VTW's


# ------------------------------------------------------------------------------- the counter's SDPA formula
def test_sdpa_formula_hand_derived():
    """CPU SDPA calls, hand-derived: q (1, 4, 5, 3), k = v (1, 4, 7, 3) take the CPU flash kernel (the formula):
    2·1·4·5·7·(3+3) = 1680 with or without a mask. With GQA (2 K/V heads) and Dv = 6, torch decomposes attention into
    bmm calls it counts itself: 2·1·4·5·7·(3+6) = 2520, which the formula gives too."""
    q, k, v = torch.randn(1, 4, 5, 3), torch.randn(1, 4, 7, 3), torch.randn(1, 4, 7, 3)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}):
        with flop_counter() as counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        assert counter.get_total_flops() == 1680, kwargs
    k, v = torch.randn(1, 2, 7, 3), torch.randn(1, 2, 7, 6)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert counter.get_total_flops() == 2520 == _sdpa_flops(q.shape, k.shape, v.shape)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sdpa_formula_equals_eager_attention(family):
    """The same generate under SDPA (formula above) and eager attention (matmuls torch counts itself) gives the same
    count, component by component: the formula is checked against the counter's own arithmetic, not against the
    analytic model. Qwen2.5-VL adds the vision tower's windowed attention and GQA in the decoder."""
    counts = []
    for impl in ("sdpa", "eager"):
        model = build_tiny_model(family, attn_implementation=impl, num_layers=2)
        batch = make_batch(model, [Sample(images=1, prefix=3, suffix=4)])
        counts.append(_measure(model, batch, 2, layer=1))
    assert counts[0] == counts[1]
    assert counts[0]["decoder"] > 0 and counts[0]["vision_tower"] > 0


# ------------------------------------------------------------------------------- analytic == FlopCounterMode
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_flop_counter_mode(family):
    """Every family, one image (plus one video where supported), prefill and decode, K = None (vanilla), 2, 0."""
    model = build_tiny_model(family, num_layers=NUM_LAYERS)
    # non-square images exercise anyres unpadding and Qwen2.5-VL's clipped edge windows (10 x 6 patches)
    shape = (40, 24) if family.startswith("qwen") else (24, 40)
    sample = Sample(images=1, videos=int(family in VIDEO_FAMILIES), prefix=3, suffix=5, image_shape=shape)
    _compare(model, make_batch(model, [sample]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_multi_frame_video_matches_flop_counter_mode(family):
    """A Qwen video with t=2 temporal patches: attention runs per frame (and per window per frame)."""
    model = build_tiny_model(family, num_layers=NUM_LAYERS)
    vc = model.config.vision_config
    t, h, w = 2, 8, 12
    tokens = t * h * w // vc.spatial_merge_size**2
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7] + [VIDEO_ID] * tokens + [8, 9, 10, 11]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": 2 * (ids == VIDEO_ID).int(),
        "pixel_values_videos": torch.rand(t * h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g),
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }
    _compare(model, batch, layers=(None, 1))


def test_text_only_sample_matches_flop_counter_mode():
    """No vision input: the encoder does not run and withdrawal changes nothing."""
    model = build_tiny_model("llava", num_layers=NUM_LAYERS)
    batch = make_batch(model, [Sample(prefix=6, suffix=3)])
    _compare(model, batch, layers=(None, 1))
    a = count_flops(model.config, SampleCounts(vision_tokens=0, text_tokens=9, generated_tokens=3))
    b = count_flops(model.config, SampleCounts(vision_tokens=0, text_tokens=9, generated_tokens=3), Withdrawal(layer=1))
    assert a.total == b.total and a.prefill.vision_tower == 0


# ------------------------------------------------------------------------------------- hand-derived config
def _hand_config() -> T.LlavaConfig:
    sizes = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    text = T.LlamaConfig(**sizes, **heads, max_position_embeddings=64, tie_word_embeddings=False)
    vision = T.CLIPVisionConfig(
        hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2, image_size=4, patch_size=2
    )
    return T.LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=9,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def test_hand_derived_numbers():
    """Decoder L=2, d=8, H=2 query heads, G=1 KV head, head_dim 4, m=12, vocab 10. CLIP: 4x4 image, 2x2 patches ->
    P=4 patches, S=5 tokens with the class token, width D=4, MLP 6, 1 block. Projector 4 -> 8 -> 8.
    Sample: V=4 vision tokens (one image), T=3 text tokens, 3 generated tokens (prefill + 2 decode steps), K=1."""
    cfg = _hand_config()
    rep = count_flops(cfg, SampleCounts(vision_tokens=4, text_tokens=3, generated_tokens=3), Withdrawal(layer=1))

    # vision: patch conv 2*P*(3*2*2)*D = 2*4*12*4 = 384; q,k,v,o 2*S*D*4D = 2*5*4*16 = 640;
    # scores 4*S*S*D = 4*25*4 = 400; MLP 2*S*D*I*2 = 2*5*4*6*2 = 480; total 1904
    assert (rep.vision.patch_embed, rep.vision.attention_proj, rep.vision.attention_scores, rep.vision.mlp) == (
        384,
        640,
        400,
        480,
    )
    assert rep.prefill.vision_tower == 384 + 640 + 400 + 480 == 1904
    # projector over the 4 patch rows (class token dropped): 4 * 2*(4*8 + 8*8) = 4 * 192 = 768
    assert rep.prefill.projector == 4 * 2 * (4 * 8 + 8 * 8) == 768
    # decoder prefill, layer 0 sees n=7 tokens, layer 1 (>= K) n=3.
    # q,k,v,o per token: 2*d*head_dim*(2H + 2G) = 2*8*4*(4+2) = 384  -> 7*384 + 3*384 = 3840
    assert rep.prefill.decoder_attention_proj == 7 * 384 + 3 * 384 == 3840
    # scores 4*n*n*H*head_dim = 32 n^2 -> 32*49 + 32*9 = 1568 + 288 = 1856
    assert rep.prefill.decoder_attention_scores == 32 * 49 + 32 * 9 == 1856
    # MLP 2*n*d*m*3 = 576 n -> 576*7 + 576*3 = 5760
    assert rep.prefill.decoder_mlp == 576 * 10 == 5760
    # LM head at the last position only: 2*d*vocab = 160
    assert rep.prefill.lm_head == 160
    assert rep.prefill.total == 1904 + 768 + 3840 + 1856 + 5760 + 160 == 14288
    # decode: 2 steps x 2 layers; step j attends over 7+j keys in layer 0 and 3+j in layer 1:
    # keys 8+4 + 9+5 = 26 -> scores 32*26 = 832; proj 2*2*384 = 1536; MLP 2*2*576 = 2304; LM head 2*160 = 320
    assert rep.decode.decoder_attention_scores == 32 * 26 == 832
    assert rep.decode.decoder_attention_proj == 2 * 2 * 384 == 1536
    assert rep.decode.decoder_mlp == 2 * 2 * 576 == 2304
    assert rep.decode.lm_head == 2 * 160 == 320
    assert rep.total == 14288 + 832 + 1536 + 2304 + 320 == 19280
    assert rep.tflops == 19280 / 1e12

    # paper convention: F(n) = 4nd^2 + 2n^2d + 2ndm = 256n + 16n^2 + 192n; F(7) = 3920, F(3) = 1488
    assert paper_flops(cfg, SampleCounts(vision_tokens=4, text_tokens=3), Withdrawal(layer=1)) == 3920 + 1488 == 5408
    assert paper_flops(cfg, SampleCounts(vision_tokens=4, text_tokens=3)) == 2 * 3920 == 7840

    # KV cache, bf16: 2 (K, V) * 1 KV head * 4 * 2 bytes = 16 bytes per token per layer; after 3 generated tokens
    # layer 0 holds 7 + 2 tokens, layer 1 holds 3 + 2 (vanilla: 9 and 9)
    kv = kv_cache_bytes(
        cfg, SampleCounts(vision_tokens=4, text_tokens=3, generated_tokens=3), Withdrawal(layer=1), dtype="bfloat16"
    )
    assert kv.per_layer == (144, 80) and kv.total == 224
    assert kv.vanilla_per_layer == (144, 144) and kv.vanilla_total == 288
    assert kv.saved_fraction == pytest.approx(1 - 224 / 288)
    assert (
        kv_cache_bytes(cfg, SampleCounts(vision_tokens=4, text_tokens=3, generated_tokens=3), dtype=torch.float32).total
        == 576
    )


def test_hand_config_matches_flop_counter_mode():
    """The hand-derived config, run for real: the written-out arithmetic above is what torch counts."""
    cfg = _hand_config()
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1] + [9] * 4 + [2, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.rand(1, 3, 4, 4)}
    many = _measure(model, batch, 3, 1)
    assert many["total"] == 19280


# ----------------------------------------------------------------------------------------- image layouts
@pytest.mark.parametrize(
    ("family", "max_crops"),
    [("llava_next", None), ("llava_onevision", None), ("llava_onevision", 1), ("llava_next_video", None)],
)
def test_anyres_layout_matches_model(family, max_crops):
    """image_layout's token and crop counts equal what the model's own feature extractor produces (OneVision with
    ``anyres_max_1`` exercises its bilinear downscaling)."""
    cfg = tiny_config(family, num_layers=1)
    if max_crops is not None:
        cfg.vision_aspect_ratio = f"anyres_max_{max_crops}"  # forces the bilinear downscale on a 2-crop grid
    model = getattr(T, type(cfg).__name__.replace("Config", "ForConditionalGeneration"))(cfg).eval()
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = cfg.vision_config.image_size
    for hw in [(32, 32), (24, 40), (40, 24), (64, 20), (17, 64)]:
        crops = image_size_to_num_patches(hw, cfg.image_grid_pinpoints, size)
        pixels = torch.rand(1, crops, 3, size, size)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([hw])).pooler_output
        layout = image_layout(cfg, hw)
        assert layout.vision_tokens == feats[0].shape[0], hw
        assert layout.workload.image_inputs == crops, hw
        work = workload_from_inputs(cfg, pixel_values=pixels, image_sizes=torch.tensor([hw]))
        assert work.image_inputs == crops


def test_default_layouts_of_shipped_checkpoints():
    """One 640x480 photo: LLaVA-1.5 576 tokens; LLaVA-NeXT 2x2 grid, 36 unpadded rows of 48 + newlines + base
    = 576 + 36*48 + 36 = 2340; OneVision 729 + 40*54 + 40 = 2929; Qwen 476x644 -> 34x46 patches -> 17*23 = 391;
    Video-LLaVA 256."""
    expected = {
        "llava-1.5-7b": (576, 1),
        "llava-1.5-13b": (576, 1),
        "llava-next-7b": (576 + 36 * 48 + 36, 5),
        "llava-next-video-7b": (576 + 36 * 48 + 36, 5),
        "llava-onevision-7b": (729 + 40 * 54 + 40, 5),
        "video-llava-7b": (256, 1),
    }
    for name, (tokens, crops) in expected.items():
        layout = image_layout(load_model_config(name), (480, 640))
        assert (layout.vision_tokens, layout.workload.image_inputs) == (tokens, crops), name
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        layout = image_layout(load_model_config(name), (480, 640))
        assert layout.workload.grids == ((1, 34, 46),) and layout.vision_tokens == 17 * 23 == 391


# --------------------------------------------------------------------------------------- shipped configs
# (L, d, query heads, KV heads, MLP m, vocab, vision kind, vision blocks, vision width): public checkpoint facts
SHIPPED_FACTS = {
    "llava-1.5-7b": (32, 4096, 32, 32, 11008, 32064, "clip", 24, 1024),
    "llava-1.5-13b": (40, 5120, 40, 40, 13824, 32064, "clip", 24, 1024),
    "llava-next-7b": (32, 4096, 32, 32, 11008, 32064, "clip", 24, 1024),
    "llava-onevision-7b": (28, 3584, 28, 4, 18944, 152128, "siglip", 26, 1152),
    "qwen2-vl-7b": (28, 3584, 28, 4, 18944, 152064, "qwen2_vl", 32, 1280),
    "qwen2.5-vl-7b": (28, 3584, 28, 4, 18944, 152064, "qwen2_5_vl", 32, 1280),
    "video-llava-7b": (32, 4096, 32, 32, 11008, 32064, "clip", 24, 1024),
    "llava-next-video-7b": (32, 4096, 32, 32, 11008, 32064, "clip", 24, 1024),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_FACTS))
def test_shipped_config_loads_offline(name):
    from vtw.flops import architecture

    assert set(SHIPPED_FACTS) == set(SHIPPED_CHECKPOINTS)
    cfg = load_model_config(name)
    assert load_model_config(SHIPPED_CHECKPOINTS[name]).to_dict() == cfg.to_dict()  # by hub id too
    a = architecture(cfg)
    d = a.decoder
    got = (d.num_layers, d.hidden, d.heads, d.kv_heads, d.intermediate, d.vocab, a.vision.kind, a.vision.layers)
    assert (*got, a.vision.hidden) == SHIPPED_FACTS[name]
    assert d.head_dim == 128


def test_llava_15_7b_reference_figures():
    """LLaVA-1.5-7B, 576 image tokens + 60 text tokens, 1 generated token: the docs/flops.md / report figures."""
    cfg = load_model_config("llava-1.5-7b")
    n = 636
    # paper: 32 * (4*n*4096^2 + 2*n^2*4096 + 2*n*4096*11008)
    assert paper_flops(cfg, SampleCounts(vision_tokens=576, text_tokens=60)) == 32 * (
        4 * n * 4096**2 + 2 * n * n * 4096 + 2 * n * 4096 * 11008
    )
    # exact decoder: per token per layer q,k,v,o 8*4096^2 + MLP 6*4096*11008, scores 4*n*n*4096 per layer
    rep = count_flops(cfg, SampleCounts(vision_tokens=576, text_tokens=60, generated_tokens=1))
    assert rep.prefill.decoder == 32 * (n * (8 * 4096**2 + 6 * 4096 * 11008) + 4 * n * n * 4096)
    # CLIP-L/336: 24 blocks over 577 tokens; conv 2*576*588*1024; projector 576 rows of 2*(1024*4096 + 4096^2)
    s = 577
    assert rep.prefill.vision_tower == 2 * 576 * 588 * 1024 + 24 * (
        s * (8 * 1024**2 + 4 * 1024 * 4096) + 4 * s * s * 1024
    )
    assert rep.prefill.projector == 576 * 2 * (1024 * 4096 + 4096 * 4096)
    assert rep.prefill.lm_head == 2 * 4096 * 32064
    vtw = count_flops(cfg, SampleCounts(vision_tokens=576, text_tokens=60, generated_tokens=1), Withdrawal(layer=16))
    assert 0.40 < 1 - vtw.total / rep.total < 0.46
    kv = kv_cache_bytes(cfg, SampleCounts(vision_tokens=576, text_tokens=60, generated_tokens=1))
    assert kv.total == 32 * 636 * 2 * 32 * 128 * 2  # 318 MiB


def _conf_model_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", _conf_model_names() or ["<no conf/model>"])
def test_plan_runs_offline_for_every_conf_model(name):
    if name == "<no conf/model>":
        pytest.skip("conf/model has no model configs yet")
    if name not in available_models():
        assert not (REPO / "vtw" / "assets" / name).exists(), f"{name}: asset folder without config.json"
        pytest.skip(f"{name}: embedded model vtw/assets/{name} not built yet")
    out = io.StringIO()
    result = plan_flops(name, text_tokens=64, generated_tokens=16, console=Console(file=out, width=140))
    text = out.getvalue()
    num_layers = result.rows[0].num_layers
    assert len(result.rows) == num_layers + 1 and result.rows[0].vanilla and result.rows[-1].layer == 0
    assert "vanilla" in text and "4nd^2 + 2n^2d + 2ndm" in text
    saved = [r.saved_pct for r in result.rows]
    assert saved == sorted(saved) and saved[0] == 0.0 and saved[-1] > 0  # earlier withdrawal saves more


def test_flops_table_rows_and_render():
    cfg = load_model_config("qwen2.5-vl-7b")
    layout = image_layout(cfg)
    rows = flops_table(
        cfg,
        SampleCounts(
            vision_tokens=layout.vision_tokens, text_tokens=40, generated_tokens=8, vision_grids=layout.workload.grids
        ),
        layers=[28, 14, 7],
    )
    assert [r.layer for r in rows] == [28, 14, 7]
    vanilla = count_flops(
        cfg,
        SampleCounts(
            vision_tokens=layout.vision_tokens, text_tokens=40, generated_tokens=8, vision_grids=layout.workload.grids
        ),
    )
    assert rows[0].flops == vanilla.total and rows[0].saved_pct == 0.0
    assert rows[1].paper_flops == paper_flops(
        cfg, SampleCounts(vision_tokens=layout.vision_tokens, text_tokens=40), Withdrawal(layer=14)
    )
    table = render_flops_table(rows, title="t")
    assert table.row_count == 3
    report = vanilla.to_dict()
    assert report["flops"] == vanilla.total and report["prefill_lm_head"] == 2 * 3584 * 152064


def test_plan_with_token_budget():
    """Explicit token budgets: whole images for LLaVA-1.5, a near-square grid for Qwen, the image's crops for NeXT."""
    out = Console(file=io.StringIO(), width=140)
    r = plan_flops("llava-1.5-7b", vision_tokens=1152, text_tokens=60, generated_tokens=1, layers=[32, 8], console=out)
    assert r.workload.image_inputs == 2
    r = plan_flops("qwen2-vl-7b", vision_tokens=391, text_tokens=60, generated_tokens=1, layers=[28], console=out)
    assert r.workload.grids == ((1, 34, 46),)
    r = plan_flops("llava-next-7b", vision_tokens=2880, text_tokens=60, generated_tokens=1, layers=[32], console=out)
    assert r.vision_tokens == 2880 and r.workload.image_inputs == 5


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vision_tokens": -1}, "vision_tokens must be >= 0"),
        ({"text_tokens": 0}, "text_tokens must be >= 1"),
        ({"generated_tokens": -2}, "generated_tokens must be >= 0"),
        ({"generated_tokens": 1.5}, "generated_tokens must be an integer"),
        ({"vision_tokens": True}, "vision_tokens must be an integer"),
        ({"layer": 33}, "out of range: allowed 0..32"),
        ({"layer": -1}, "out of range"),
        ({"layer": 2.0}, "must be an integer"),
        ({"vision_tokens": 500}, "not a whole number of images of 576 tokens"),
        ({"vision_inputs": 2}, "give 1152 vision tokens, not vision_tokens=576"),
        ({"prefill_logits": 1000}, "exceeds the 636 positions"),
        ({"video_frames": 8}, "takes no video"),
    ],
)
def test_bad_counts_raise(kwargs, match):
    cfg = load_model_config("llava-1.5-7b")
    args = {"vision_tokens": 576, "text_tokens": 60, "generated_tokens": 4, **kwargs}
    layer, logits = args.pop("layer", None), args.pop("prefill_logits", 1)
    with pytest.raises(ValueError, match=match):
        count_flops(cfg, SampleCounts(**args), Withdrawal(layer=layer), prefill_logits=logits)


def test_bad_workloads_and_models_raise():
    with pytest.raises(ValueError, match="pass vision_inputs"):
        count_flops(load_model_config("llava-next-7b"), SampleCounts(vision_tokens=2340, text_tokens=60))
    qwen = load_model_config("qwen2-vl-7b")
    with pytest.raises(ValueError, match="pass vision_grids"):
        count_flops(qwen, SampleCounts(vision_tokens=391, text_tokens=60))
    with pytest.raises(ValueError, match="give 390 vision tokens"):
        count_flops(qwen, SampleCounts(vision_tokens=391, text_tokens=60, vision_grids=[(1, 30, 52)]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        count_flops(qwen, SampleCounts(vision_tokens=391, text_tokens=60, vision_grids=[(1, 33, 47)]))
    with pytest.raises(ValueError, match="unknown model 'llava-9b'.*llava-1.5-7b"):
        plan_flops("llava-9b", text_tokens=60, generated_tokens=1)
    with pytest.raises(ValueError, match="not supported by vtw. Supported: LLaVA-1.5"):
        count_flops(T.LlamaConfig(), SampleCounts(vision_tokens=0, text_tokens=5))
    with pytest.raises(ValueError, match="unknown KV-cache dtype 'float12'"):
        kv_cache_bytes(
            load_model_config("llava-1.5-7b"), SampleCounts(vision_tokens=576, text_tokens=60), dtype="float12"
        )
    with pytest.raises(ValueError, match="out of range"):
        paper_flops(
            load_model_config("llava-1.5-7b"), SampleCounts(vision_tokens=576, text_tokens=60), Withdrawal(layer=40)
        )
    with pytest.raises(ValueError, match="image_size must be"):
        image_layout(load_model_config("llava-next-7b"), (480, -1))
    with pytest.raises(ValueError, match="layers is empty"):
        flops_table(
            load_model_config("llava-1.5-7b"),
            SampleCounts(vision_tokens=576, text_tokens=60, generated_tokens=1),
            layers=[],
        )


# ----------------------------------------------------------------------------------- shipped checkpoint ids
def test_shipped_checkpoints_have_one_home(tmp_path, monkeypatch):
    """The hub id of a shipped checkpoint is its config file's ``_name_or_path``; ``conf/model/<name>.yaml`` reads
    it from there (``${vtw_checkpoint:<name>}``), so the config, the FLOPs lookup by hub id and the table agree."""
    import json

    from vtw.flops import configs
    from vtw.pipeline.config import compose_config

    folder = REPO / "vtw" / "assets" / "hf_configs"
    for name, hub in SHIPPED_CHECKPOINTS.items():
        assert json.loads((folder / f"{name}.json").read_text())["_name_or_path"] == hub
        assert compose_config([f"model={name}"]).model.pretrained == hub
    assert set(SHIPPED_CHECKPOINTS) == {p.stem for p in folder.glob("*.json")}
    with pytest.raises(ValueError, match="no shipped checkpoint 'gpt-5'.*llava-1.5-7b"):
        configs.checkpoint_of("gpt-5")
    # a shipped config without its hub id is refused, naming the file
    (tmp_path / "hf_configs").mkdir()
    (tmp_path / "hf_configs" / "mine.json").write_text(json.dumps({"model_type": "llava"}))
    monkeypatch.setattr(configs, "_assets", lambda: tmp_path)
    with pytest.raises(ValueError, match=r"mine\.json: _name_or_path must be the checkpoint's hub id"):
        configs._shipped_checkpoints()


def test_plan_for_a_peer_method_lists_its_settings():
    """mode=flops for another method: the vanilla row, the configured setting, then its settings along the free
    parameter with decreasing compute; each row's figures are count_flops / kv_cache_bytes of that setting."""
    cfg = load_model_config("llava-1.5-7b")
    console = Console(file=io.StringIO(), width=200)
    plan = plan_flops("llava-1.5-7b", text_tokens=60, generated_tokens=4, console=console,
                      method=FastV(layer=2, keep=0.5))  # fmt: skip
    rows = plan.rows
    assert rows[0].vanilla and rows[1].label == "fastv K=2 keep=0.5" and len(rows) == 12
    flops = [r.flops for r in rows[2:]]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == len(flops)
    rep = count_flops(
        cfg,
        SampleCounts(vision_tokens=576, text_tokens=60, generated_tokens=4, vision_inputs=1),
        FastV(layer=2, keep=0.5),
    )
    kv = kv_cache_bytes(
        cfg, SampleCounts(vision_tokens=576, text_tokens=60, generated_tokens=4), FastV(layer=2, keep=0.5)
    )
    assert (rows[1].flops, rows[1].kv_bytes) == (rep.total, kv.total)
    assert "fastv K=2 keep=0.5" in console.file.getvalue()


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b"])
def test_plan_for_pool_counts_the_default_images_grids(name):
    """mode=flops for ``pool``: the default image's grids (LLaVA-NeXT: base crop + unpadded grid of a 640x480 photo;
    Qwen: its smart_resize grid), every decoder layer on the pooled count, hand-derived for 2x2."""
    from vtw.methods import Pool

    console = Console(file=io.StringIO(), width=200)
    plan = plan_flops(name, text_tokens=60, generated_tokens=4, console=console, method=Pool(stride=2))
    cfg = load_model_config(name)
    pooled = {"llava-1.5-7b": 144, "llava-next-7b": 144 + 18 * 25, "qwen2-vl-7b": None}[name]
    if pooled is None:  # Qwen: 640x480 -> smart_resize 644x476 -> 34 x 46 patches -> 17 x 23 merged -> 9 x 12
        assert plan.workload.grids == ((1, 34, 46),)
        pooled = 9 * 12
    grids = get_family(cfg).layout.image_sample(cfg, 480, 640)  # the default image's, where counts cannot give them
    rep = count_flops(
        cfg, SampleCounts.of(plan.workload, plan.vision_tokens, 60, 4, vision_layout=grids), Pool(stride=2)
    )
    assert rep.prefill_decoder_tokens == (pooled + 60,) * rep.num_layers
    assert plan.rows[1].label == "pool 2x2" and plan.rows[1].flops == rep.total
    flops = [r.flops for r in plan.rows[1:]]
    assert flops[1:] == sorted(flops[1:], reverse=True)
