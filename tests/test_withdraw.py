"""VTW core: exactness against an independent naive reference, batching, undo, bad input — every family, eager + SDPA."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, IMAGE_ID, VIDEO_FAMILIES, VIDEO_ID, Sample, build_tiny_model, make_batch, make_singles

import vtw
from vtw import withdraw

ATTN = ("eager", "sdpa")
NUM_LAYERS = 4
NEW_TOKENS = 4
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
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype)
    return torch.triu(m, diagonal=1)[None, None]


def _rotary(lm, h: torch.Tensor, pos: torch.Tensor) -> tuple:
    """``(cos, sin, position ids)`` the decoder gives its layers for ``h`` at ``pos`` (Qwen's 4-row M-RoPE position ids
    carry the text positions in row 0: the rotary module and the layers take rows 1..3)."""
    cos, sin = lm.rotary_emb(h, pos if pos.dim() == 2 or pos.shape[0] == 3 else pos[1:])
    return cos, sin, (pos if not (pos.dim() == 3 and pos.shape[0] == 4) else pos[1:])


def _naive_logits(model, embeds, pos, vision: torch.Tensor, k: int) -> torch.Tensor:
    """Layers by hand, no cache: every token through ``0..k-1``, drop vision positions, text through ``k..L-1``.

    Returns the logits of the positions that reach the last layer, ``(n_kept, V)``.
    """
    lm = vtw.language_model(model)
    h = embeds
    cos, sin, mpos = _rotary(lm, h, pos)
    keep = torch.arange(h.shape[1])
    for i, layer in enumerate(lm.layers):
        if i == k:
            keep = torch.nonzero(~vision[0]).flatten()
            h = h[:, keep]
            cos, sin = cos[..., keep, :], sin[..., keep, :]
            mpos = mpos[..., keep]
        h = layer(
            h,
            attention_mask=_causal(h.shape[1], h.dtype),
            position_embeddings=(cos, sin),
            position_ids=mpos,
            past_key_values=None,
            use_cache=False,
        )
    return model.lm_head(lm.norm(h))[0]


def _extend(inputs: dict, token: int) -> dict:
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.int)], dim=1)
    return out


def _naive_generate(model, inputs: dict, k: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with a full recomputation (no KV cache) of the withdrawn model at every step."""
    tokens, step_logits = [], []
    cur = inputs
    with torch.no_grad():
        for _ in range(steps):
            embeds, pos = _lm_inputs(model, cur)
            vision = _vision(model, cur["input_ids"])
            logits = _naive_logits(model, embeds, pos, vision, k)[-1]
            token = int(logits.argmax())
            tokens.append(token)
            step_logits.append(logits)
            cur = _extend(cur, token)
    return tokens, step_logits


def _vtw_generate(model, inputs: dict, k: int, steps: int):
    with torch.no_grad(), withdraw(model, k):
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    n = inputs["input_ids"].shape[1]
    return out.sequences[:, n:], torch.stack(out.logits, dim=1)  # (B, steps), (B, steps, V)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_none_and_L_are_the_untouched_model_and_remove_restores(family, attn):
    model = _model(family, attn)
    batch = make_batch(model, _prompt(family) + [Sample(prefix=6, suffix=2)])
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        for layer in (None, NUM_LAYERS):
            with withdraw(model, layer) as handle:
                assert not handle.active
                assert torch.equal(model(**batch).logits, ref)
                assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)
        handle = withdraw(model, 1)
        changed = model(**batch).logits
        assert changed.shape[1] < ref.shape[1]  # withdrawal really happened
        handle.remove()
        assert torch.equal(model(**batch).logits, ref)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_naive_reference(family, attn):
    model = _model(family, attn)
    (inputs,) = make_singles(model, _prompt(family))
    vision = _vision(model, inputs["input_ids"])
    assert vision.sum() > 0
    for k in (0, 1, 2, NUM_LAYERS - 1, NUM_LAYERS):
        ref_tokens, ref_logits = _naive_generate(model, inputs, k, NEW_TOKENS)
        tokens, logits = _vtw_generate(model, inputs, k, NEW_TOKENS)
        assert tokens[0].tolist() == ref_tokens, f"K={k}"
        torch.testing.assert_close(logits[0], torch.stack(ref_logits), atol=ATOL, rtol=0, msg=f"K={k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_cover_text_positions(family):
    model = _model(family, "sdpa")
    (inputs,) = make_singles(model, _prompt(family))
    vision = _vision(model, inputs["input_ids"])
    embeds, pos = _lm_inputs(model, inputs)
    with torch.no_grad():
        ref = _naive_logits(model, embeds, pos, vision, 2)
        with withdraw(model, 2) as handle:
            out = model(**inputs).logits[0]
    text_positions = torch.nonzero(~vision[0]).flatten()
    assert torch.equal(handle.last_keep_index[0], text_positions)
    assert out.shape[0] == int((~vision).sum())
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(family, attn):
    model = _model(family, attn)
    if vtw.get_family(model).image_layout != "single":  # the vision tokens of an image depend on its size
        big = Sample(images=1, prefix=2, suffix=3, image_shape=(32, 64))  # more vision tokens than the 32x32 one
    else:
        big = Sample(images=2, prefix=2, suffix=3)
    samples = [Sample(images=1, prefix=3, suffix=6), Sample(prefix=9, suffix=4), big]
    if family in VIDEO_FAMILIES:
        samples.append(Sample(videos=1, prefix=1, suffix=2))
    batch = make_batch(model, samples)
    counts = vtw.vision_token_mask(model, batch["input_ids"]).sum(1).tolist()
    assert counts[1] == 0 and 0 < counts[0] < counts[2], counts  # a text-only sample + different vision counts
    assert (batch["attention_mask"] == 0).any()  # left padding present
    tokens, logits = _vtw_generate(model, batch, 2, NEW_TOKENS)
    for i, single in enumerate(make_singles(model, samples)):
        t, lg = _vtw_generate(model, single, 2, NEW_TOKENS)
        assert tokens[i].tolist() == t[0].tolist(), f"sample {i}"
        torch.testing.assert_close(logits[i], lg[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_deep_kv_cache_holds_text_only(family):
    model = _model(family, "sdpa")
    (inputs,) = make_singles(model, _prompt(family))
    n_total = inputs["input_ids"].shape[1]
    n_text = int((~vtw.vision_token_mask(model, inputs["input_ids"])).sum())
    with torch.no_grad(), withdraw(model, 2):
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        lengths = [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)]
        assert lengths == [n_total, n_total, n_text, n_text]
        # one decode step appends one token to every layer
        # (no attention_mask: Qwen2-VL would then build positions for the whole sequence; generate slices them)
        model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)
        assert [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)] == [n_total + 1] * 2 + [n_text + 1] * 2


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
