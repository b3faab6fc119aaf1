"""FastV, PyramidDrop and random vision pruning: which tokens they keep, every family, eager and SDPA, against an
independent naive reference written here; exact declared counts; continuations scored on the prompt's choice; errors.

The reference calls the decoder layers by hand without a cache, on a model loaded with eager attention: at each stage
of the prompt's pass it takes the attention probabilities from the layer's own eager attention module (FastV: layer
K-1's weights as the layer ran; PyramidDrop: layer ℓ's attention module applied to the hidden states entering ℓ),
the last token's row averaged over heads, picks the top ``ceil(keep · V)`` vision tokens itself and drops the rest.
The method under test runs under eager and SDPA alike (same weights); its choice is read from the handle's stage
records. Cached generation on that choice == the shared naive reference (tests/reference.py), batch == alone,
``keep=1`` installing nothing and ``remove()`` are the conformance suite's (tests/test_conformance.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_withdraw import _causal, _extend, _lm_inputs, _prompt, _rotary, _vision
from tiny_models import FAMILIES, Sample, build_tiny_model, make_batch, make_singles

import vtw
from vtw import withdraw
from vtw.methods import FastV, PyramidDrop, RandomVision
from vtw.methods.attention import last_token_attention

NUM_LAYERS = 4
ATOL = 1e-4


def _model(family, attn):
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    model.generation_config.eos_token_id = None
    return model


def _top(scores: torch.Tensor, is_vision: torch.Tensor, share: float, n_vision: int) -> torch.Tensor:
    """Indices (into the current tokens) kept: all text + the ceil(share · n_vision) best-scored vision tokens."""
    n = min(int(is_vision.sum()), math.ceil(round(share * n_vision, 9)))
    vis = torch.nonzero(is_vision).flatten()
    best = vis[torch.argsort(scores[vis], descending=True, stable=True)[:n]]
    keep = ~is_vision
    keep[best] = True
    keep[-1] = True
    return torch.nonzero(keep).flatten()


def _attn_row(layer, h, cos, sin) -> torch.Tensor:
    """The last token's attention probabilities in ``layer`` over the current tokens, mean over heads, from the
    layer's eager attention module (the model is loaded with eager attention)."""
    _, weights = layer.self_attn(layer.input_layernorm(h), position_embeddings=(cos, sin),
                                 attention_mask=_causal(h.shape[1], h.dtype))  # fmt: skip
    return weights[0, :, -1, :].mean(0)


def _naive_logits(model, embeds, pos, vision, method, n_prompt: int, chosen: dict | None = None):
    """Layers by hand, no cache. The first call (the prompt alone, ``chosen=None``) picks the kept tokens at each
    stage and returns them as input positions, ``{layer: positions}``; later calls (prompt + generated tokens) keep
    those prompt tokens and every generated one, as a KV cache filled at prefill does.

    Returns ``(logits of the surviving positions, chosen)``.
    """
    lm = vtw.language_model(model)
    h = embeds
    cos, sin, mpos = _rotary(lm, h, pos)
    is_vision = vision[0].clone()
    alive = torch.arange(h.shape[1])
    n_vision = int(is_vision.sum())
    if isinstance(method, PyramidDrop):
        plan = {layer: share for layer, share in zip(method.layers, method.keep)}
    else:
        plan = {method.layer: method.keep}
    picking = chosen is None
    chosen = {} if picking else chosen
    previous_row = None
    g = torch.Generator().manual_seed(method.seed) if isinstance(method, RandomVision) else None
    for i, layer in enumerate(lm.layers):
        if i in plan:
            if picking:
                if isinstance(method, FastV):
                    scores = previous_row
                elif isinstance(method, PyramidDrop):
                    scores = _attn_row(layer, h, cos, sin)
                else:  # random vision: a random rank per vision token, drawn in position order
                    scores = torch.zeros(h.shape[1])
                    scores[is_vision] = torch.rand(int(is_vision.sum()), generator=g) + 1
                chosen[i] = alive[_top(scores, is_vision, plan[i], n_vision)]
            local = torch.nonzero(torch.isin(alive, chosen[i]) | (alive >= n_prompt)).flatten()
            h, cos, sin, mpos = h[:, local], cos[..., local, :], sin[..., local, :], mpos[..., local]
            is_vision, alive = is_vision[local], alive[local]
        if isinstance(method, FastV) and i == method.layer - 1 and picking:
            previous_row = _attn_row(layer, h, cos, sin)
        h = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_embeddings=(cos, sin), position_ids=mpos,
                  past_key_values=None, use_cache=False)  # fmt: skip
    return model.lm_head(lm.norm(h))[0], chosen


SETTINGS = {
    "fastv": [dict(layer=2, keep=0.5), dict(layer=1, keep=0.01), dict(layer=3, keep=0.75)],
    "pdrop": [dict(layers=(1, 2, 3), keep=(0.5, 0.25, 0.125)), dict(layers=(0, 2), keep=(0.6, 0.01))],
    "random_vision": [dict(layer=2, keep=0.5, seed=0), dict(layer=0, keep=0.3, seed=7)],
}
_CLASSES = {"fastv": FastV, "pdrop": PyramidDrop, "random_vision": RandomVision}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_stage_keeps_what_the_naive_ranking_picks(name, family, attn):
    reference_model = _model(family, "eager")  # same seed: the same weights as the model under test
    model = reference_model if attn == "eager" else _model(family, attn)
    (inputs,) = make_singles(model, _prompt(family))
    vision = _vision(model, inputs["input_ids"])
    assert vision.sum() > 4
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        embeds, pos = _lm_inputs(reference_model, inputs)
        for params in SETTINGS[name]:
            _, chosen = _naive_logits(reference_model, embeds, pos, vision, _CLASSES[name](**params), n_prompt)
            with withdraw(model, method=name, **params) as handle:
                model(**inputs)
            kept = {record.layer: record.keep_index[0] for record in handle.last_stages}
            assert kept.keys() == chosen.keys(), params
            for layer, columns in chosen.items():
                assert torch.equal(kept[layer], columns), (params, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_attention_equals_eager_weights(family):
    """The recomputed scores == the layer's own eager attention weights (last row, mean over heads), batch with left
    padding and GQA (4 query heads over 2 key/value heads in the tiny decoders)."""
    model = _model(family, "eager")
    batch = make_batch(model, [Sample(images=1, prefix=3, suffix=4), Sample(prefix=5, suffix=2)])
    seen = {}
    layer = vtw.language_model(model).layers[1]
    pre = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True,
    )
    post = layer.self_attn.register_forward_hook(lambda m, a, out: seen.update(w=out[1]))
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        pre.remove()
        post.remove()
    ours = last_token_attention(layer, seen["h"], seen["pe"], batch["attention_mask"])
    torch.testing.assert_close(ours, seen["w"][:, :, -1, :].float().mean(1), atol=1e-6, rtol=0)


def test_realized_counts_are_the_declared_ones():
    """The counts the FLOPs model declares (``layer_tokens``) are exact for these methods: what each layer processed."""
    model = _model("llava", "sdpa")
    (inputs,) = make_singles(model, _prompt("llava"))
    v = int(_vision(model, inputs["input_ids"]).sum())
    t = inputs["input_ids"].shape[1] - v
    for name, settings in SETTINGS.items():
        for params in settings:
            with torch.no_grad(), withdraw(model, method=name, **params) as handle:
                model(**inputs)
            declared = [list(p) for p in handle.method.layer_tokens(NUM_LAYERS, v, t)]
            assert handle.last_layer_tokens[0].tolist() == declared, (name, params)


def test_the_api_calls_of_the_issue():
    model = _model("llava", "sdpa")
    assert withdraw(model, layer=2, method="fastv", keep=0.5).method == FastV(layer=2, keep=0.5)
    h = withdraw(model, method="pdrop", layers=(1, 2, 3), keep=(0.5, 0.25, 0.125))
    assert h.stages == (1, 2, 3)
    h.remove()
    h = withdraw(model, method="pdrop")  # the paper's (8, 16, 24) of 32 scaled to L = 4: (1, 2, 3)
    assert h.stages == (1, 2, 3)
    h.remove()
    assert withdraw(model, layer=2, method="random_vision", keep=0.5, seed=0).method == RandomVision(2, 0.5, 0)
    model = _model("llava", "sdpa")  # fresh: the handles above were not removed
    assert withdraw(model, layer=2).method == vtw.Withdrawal(layer=2)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(method="fastv", layer=2, keep=0.0), "fastv keep must be a number in (0, 1]"),
        (dict(method="fastv", layer=2, keep=1.5), "got 1.5"),
        (dict(method="fastv", layer=0, keep=0.5), "fastv layer must be an integer in [1, 4]"),
        (dict(method="fastv", layer=9), "fastv layer 9 is out of range"),
        (dict(method="random_vision", layer=2, keep=-0.1), "random_vision keep must be a number in (0, 1]"),
        (dict(method="random_vision", layer=5), "random_vision layer 5 is out of range"),
        (dict(method="pdrop", layers=(2, 1, 3)), "pdrop layers must be strictly increasing, got [2, 1, 3]"),
        (dict(method="pdrop", layers=(1, 2, 4)), "pdrop layers [1, 2, 4] are out of range: allowed 0..3"),
        (dict(method="pdrop", layers=(1, 2), keep=(0.5, 0.25, 0.1)), "must have the same length"),
        (dict(method="pdrop", keep=(0.25, 0.5)), "non-increasing"),
        (dict(method="pdrop", keep=(0.5, 0.25)), "needs its layers"),
        (dict(method="fastv", layer=2, keep=0.5, seed=1), "takes keep, layer; got unknown seed"),
        (dict(method="no_such_method"), "unknown withdrawal method 'no_such_method'"),
    ],
)
def test_bad_parameters_fail_before_any_forward(kwargs, needle):
    model = _model("llava", "sdpa")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as info:
        withdraw(model, **kwargs)
    assert needle in str(info.value), str(info.value)
    assert not calls


#: two continuations of one prompt (text ids), scored as lmms-eval's loglikelihood requests score them
CONTINUATIONS = ([7], [93, 8, 41])


def _with_continuation(inputs: dict, tokens: list[int]) -> dict:
    for t in tokens:
        inputs = _extend(inputs, t)
    return inputs


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "video_llava"])
@pytest.mark.parametrize("name", ["fastv", "pdrop", "random"])
def test_continuations_of_a_prompt_keep_what_the_prompt_alone_keeps(name, family):
    """A forward on prompt + continuation under ``handle.prompt_only`` (a loglikelihood request): the method decides
    from the prompt alone, so two continuations of one prompt keep the same prompt tokens, those of the prompt run
    alone, and every continuation token; FastV's and PyramidDrop's continuation logits == the naive reference (the
    prompt alone ranks, then its kept tokens plus every continuation token run without cache)."""
    reference_model = _model(family, "eager")
    model = _model(family, "sdpa")
    (prompt,) = make_singles(model, _prompt(family))
    n_prompt = prompt["input_ids"].shape[1]
    params = dict(layer=2, seed=0) if name == "random" else SETTINGS[name][0]
    with torch.no_grad(), withdraw(model, method=name, **params) as handle:
        model(**prompt, use_cache=False)
        alone = handle.last_keep_index[0]
        vision = _vision(model, prompt["input_ids"])[0]
        assert 0 < int(vision[alone].sum()) < int(vision.sum())  # some vision tokens go, some stay
        for cont in CONTINUATIONS:
            full = _with_continuation(prompt, cont)
            with handle.prompt_only(torch.tensor([n_prompt - 1])):
                logits = model(**full, use_cache=False).logits[0]
            kept = handle.last_keep_index[0]
            assert torch.equal(kept[kept < n_prompt], alone), cont
            assert kept[kept >= n_prompt].tolist() == list(range(n_prompt, n_prompt + len(cont)))
            if name == "random":
                continue
            method = handle.method
            _, chosen = _naive_logits(reference_model, *_lm_inputs(reference_model, prompt),
                                      _vision(model, prompt["input_ids"]), method, n_prompt)  # fmt: skip
            embeds, pos = _lm_inputs(reference_model, full)
            ref, _ = _naive_logits(reference_model, embeds, pos, _vision(model, full["input_ids"]), method, n_prompt,
                                   chosen)  # fmt: skip
            n = len(cont) + 1  # the last prompt token predicts the first continuation token
            torch.testing.assert_close(logits[-n:], ref[-n:], atol=ATOL, rtol=0, msg=str(cont))
    assert handle._prompt_end is None  # nothing of the forward stays on the handle


def test_prompt_only_refuses_positions_that_are_not_real_input_tokens_and_keeps_the_continuation():
    """Bad positions are refused; the last prompt token and the continuation go on whatever a method returns (a
    custom rule that keeps nothing)."""
    model = _model("llava", "sdpa")
    batch = make_batch(model, [Sample(images=1, prefix=3, suffix=5), Sample(prefix=2, suffix=2)])
    length = batch["input_ids"].shape[1]
    assert batch["attention_mask"][1, 0] == 0  # the second sample is left-padded
    with torch.no_grad(), withdraw(model, method="fastv", layer=2, keep=0.5) as handle:
        for bad, needle in [([length - 1], "one position per sample"), ([length - 1, 0], "not real tokens"),
                            ([length, length - 1], "not real tokens")]:  # fmt: skip
            with pytest.raises(ValueError, match=needle), handle.prompt_only(torch.tensor(bad)):
                model(**batch, use_cache=False)
        with handle.prompt_only(torch.tensor([length - 1, length - 1])):  # the default, given explicitly
            explicit = model(**batch, use_cache=False).logits
        torch.testing.assert_close(explicit, model(**batch, use_cache=False).logits, atol=1e-5, rtol=0)
    with torch.no_grad(), withdraw(model, 2, method=lambda h, v, m: torch.zeros_like(v)) as handle:
        with handle.prompt_only(torch.tensor([length - 3, length - 2])):
            model(**batch, use_cache=False)
    assert handle.last_keep_index.tolist() == [list(range(length - 3, length)), [-1, length - 2, length - 1]]
