"""VTW core: what it keeps (the text tokens, at every layer K), the prefill's logits at every kept position against the
shared naive reference (tests/reference.py), several models at once, bad input — every family, eager + SDPA.

Cached generation == the naive reference, batch == alone, K = None / L installing nothing, ``remove()`` and the deep
KV caches are the conformance suite's (tests/test_conformance.py, every registered method). The helpers below are
shared with other test files."""

from __future__ import annotations

import pytest
import torch
from reference import causal_mask, decoder_inputs, naive_logits, stage_choices
from tiny_models import FAMILIES, IMAGE_ID, VIDEO_FAMILIES, VIDEO_ID, Sample, build_tiny_model, make_singles

import vtw
from vtw import withdraw

ATTN = ("eager", "sdpa")
NUM_LAYERS = 4
ATOL = 1e-4  # float32 logits; the reference runs the same layers on the same tokens, only masks/order of ops differ


def _model(family: str, attn: str, num_layers: int = NUM_LAYERS):
    model = build_tiny_model(family, attn_implementation=attn, num_layers=num_layers)
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
    return model


def _prompt(family: str) -> list[Sample]:
    return [Sample(images=1, videos=1 if family in VIDEO_FAMILIES else 0, prefix=3, suffix=5)]


def _lm_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the untouched model once and capture what its language decoder receives: embeddings and position ids."""
    captured = {}
    lm = vtw.language_model(model)

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        captured["pos"] = kwargs.get("position_ids")

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        h.remove()
    embeds = captured["embeds"]
    pos = captured["pos"]
    if pos is None:
        pos = torch.arange(embeds.shape[1])[None]
    return embeds, pos


def _vision(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The reference's vision mask ``(B, T)``: the tiny configs' image placeholder id, and the video one where the
    family takes video (elsewhere it is an ordinary token the model may generate), not ``vtw.vision_token_mask``
    (which the method under test uses itself)."""
    ids = [IMAGE_ID] + ([VIDEO_ID] if model.config.model_type in VIDEO_FAMILIES else [])
    return torch.isin(input_ids, torch.tensor(ids))


def _causal(n: int, dtype) -> torch.Tensor:
    """Naive additive causal mask (1, 1, n, n)."""
    return causal_mask(n, dtype)


def _rotary(lm, h: torch.Tensor, pos: torch.Tensor) -> tuple:
    """``(cos, sin, position ids)`` the decoder gives its layers for ``h`` at ``pos`` (Qwen's 4-row M-RoPE position ids
    carry the text positions in row 0: the rotary module and the layers take rows 1..3)."""
    cos, sin = lm.rotary_emb(h, pos if pos.dim() == 2 or pos.shape[0] == 3 else pos[1:])
    return cos, sin, (pos if not (pos.dim() == 3 and pos.shape[0] == 4) else pos[1:])


def _extend(inputs: dict, token: int) -> dict:
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.int)], dim=1)
    return out


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_keeps_exactly_the_text_tokens(family, attn):
    """At every K in 0..L-1 the one stage keeps the text tokens (hand-derived from the placeholder ids), in order,
    and the layers see (V, T) before K and (0, T) from K on."""
    model = _model(family, attn)
    (inputs,) = make_singles(model, _prompt(family))
    vision = _vision(model, inputs["input_ids"])[0]
    n_vision, n_text = int(vision.sum()), int((~vision).sum())
    assert n_vision > 0
    for k in range(NUM_LAYERS):
        with torch.no_grad(), withdraw(model, k) as handle:
            model(**inputs)
        (record,) = handle.last_stages
        assert record.layer == k and torch.equal(record.keep_index[0], torch.nonzero(~vision).flatten()), k
        assert not record.vision.any() and not record.extra.any()
        assert handle.last_layer_tokens[0].tolist() == [[n_vision, n_text]] * k + [[0, n_text]] * (NUM_LAYERS - k)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_cover_text_positions(family):
    model = _model(family, "sdpa")
    (inputs,) = make_singles(model, _prompt(family))
    vision = _vision(model, inputs["input_ids"])
    with torch.no_grad(), withdraw(model, 2) as handle:
        out = model(**inputs).logits[0]
    text_positions = torch.nonzero(~vision[0]).flatten()
    assert torch.equal(handle.last_keep_index[0], text_positions)
    assert out.shape[0] == int((~vision).sum())
    embeds, positions = decoder_inputs(model, inputs)
    with torch.no_grad():
        ref = naive_logits(model, embeds, positions, embeds.shape[1], stage_choices(handle.last_stages))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_two_models_different_layers_and_no_class_patching():
    a, b, plain = (_model("llava", "sdpa") for _ in range(3))
    cls_forward = type(a).forward
    layer_cls_forward = type(vtw.language_model(a).layers[0]).forward
    (inputs,) = make_singles(a, _prompt("llava"))
    with torch.no_grad():
        ref = plain(**inputs).logits
        with withdraw(a, 1), withdraw(b, 3):
            la, lb, lp = a(**inputs).logits, b(**inputs).logits, plain(**inputs).logits
        torch.testing.assert_close(lp, ref, atol=0, rtol=0)
        assert la.shape == lb.shape and not torch.allclose(la, lb)
    assert type(a).forward is cls_forward
    assert type(vtw.language_model(a).layers[0]).forward is layer_cls_forward


@pytest.mark.parametrize("bad", [-1, NUM_LAYERS + 1, 1.5, "2", True])
def test_bad_layer_is_rejected_before_any_forward(bad):
    model = _model("llava", "sdpa")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as err:
        withdraw(model, bad)
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)
    assert f"0..{NUM_LAYERS}" in str(err.value) or f"[0, {NUM_LAYERS}]" in str(err.value)
    assert not calls


def test_unsupported_model_lists_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    )
    with pytest.raises(ValueError, match="Supported: .*LLaVA-1.5.*Qwen2-VL.*Video-LLaVA"):
        withdraw(model, 0)


def test_inputs_embeds_need_an_explicit_vision_mask():
    model = _model("llava", "sdpa")
    (inputs,) = make_singles(model, _prompt("llava"))
    embeds, _ = _lm_inputs(model, inputs)
    vision = vtw.vision_token_mask(model, inputs["input_ids"])
    with torch.no_grad(), withdraw(model, 2) as handle:
        ref = model(**inputs).logits
        with pytest.raises(ValueError, match="vision_mask"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        with handle.vision_mask(vision):
            out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_unknown_method_and_random_ablation():
    model = _model("llava", "sdpa")
    with pytest.raises(ValueError, match="unknown withdrawal method 'nope'"):
        withdraw(model, 1, method="nope")
    (inputs,) = make_singles(model, _prompt("llava"))
    n_vision = int(vtw.vision_token_mask(model, inputs["input_ids"]).sum())
    with torch.no_grad(), withdraw(model, 1, method="random") as handle:
        model(**inputs)
    kept = handle.last_keep_index[0]
    assert kept.numel() == inputs["input_ids"].shape[1] - n_vision
    assert int(kept[-1]) == inputs["input_ids"].shape[1] - 1  # the last token is always kept
