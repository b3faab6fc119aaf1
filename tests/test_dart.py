"""DART: what it keeps against a naive reference written here from the reference's published behaviour, its pivots
(the largest key L1 norms of layer K-1), decided from the prompt alone, hand-derived counts and quotas, exact scoring
FLOPs, clear errors. Generation, batching, no-op settings and FLOPs of whole runs are the conformance suite's.

The naive reference reads what the *untouched* model computes in one prefill: the keys layer ``K-1`` writes to its KV
cache (after its rotary embedding) and the input of layer ``K`` (a forward pre-hook), and makes DART's choice in
plain Python loops over one sample, as the reference does: key heads repeated to the query heads and concatenated,
L1 norms, the top image and text (after the image, up to the query) tokens as pivots, then per pivot the least
cosine-similar vision tokens still free, on the final-normed states. Where vtw deviates from the reference by design
(every pivot's share of an exact ``ceil(keep · V)`` budget, pivots in position order), the naive reference does too.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import reference
import torch
from test_withdraw import _extend, _vision
from tiny_models import Sample, build_tiny_model, make_singles

from vtw import language_model, withdraw
from vtw.flops import SampleCounts, count_flops, load_model_config
from vtw.methods import make_method
from vtw.methods.dart import DART

NUM_LAYERS = 4


@cache
def _model(family: str):
    """A tiny model whose decoder norms have random weights, so the final norm changes cosine similarities."""
    model = build_tiny_model(family, num_layers=NUM_LAYERS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in language_model(model).named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.8 * torch.randn(p.shape, generator=gen))
    return model


# ---------------------------------------------------------------------------------------------- the naive reference
def _prefill(model, inputs: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys (G, T, hd), states (T, D))`` of the untouched model's prefill of one sample: what layer ``layer-1``
    cached (rotary applied) and what layer ``layer`` received."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    hook = language_model(model).layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            cache_ = model(**inputs, use_cache=True).past_key_values
    finally:
        hook.remove()
    return cache_.layers[layer - 1].keys[0], seen["h"][0]


def _l1(keys: torch.Tensor, heads: int) -> list[float]:
    """Per token: the L1 norm of its keys repeated to ``heads`` query heads and concatenated (``repeat_kv``)."""
    repeated = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # (H, T, hd)
    return [float(repeated[:, t].double().abs().sum()) for t in range(keys.shape[1])]


def _top(norms: list[float], columns: list[int], count: int) -> list[int]:
    return sorted(columns, key=lambda c: (-norms[c], c))[:count]


def naive_dart(model, inputs: dict, method: DART, query: int | None = None) -> tuple[list[int], list[int]]:
    """``(kept vision columns, image pivots)`` of one sample (``query``: the last prompt column; default the last)."""
    keys, states = _prefill(model, inputs, method.layer)
    vis = _vision(model, inputs["input_ids"])[0].tolist()
    q = len(vis) - 1 if query is None else query
    image = [c for c in range(q + 1) if vis[c]]
    text = [c for c in range(image[0] + 1, q + 1) if not vis[c]]
    n = min(len(image), math.ceil(method.keep * len(image) - 1e-9))
    norms = _l1(keys, model.config.get_text_config().num_attention_heads)
    image_pivots = _top(norms, image, min(method.pivots, n))
    text_pivots = _top(norms, text, min(method.pivots, len(text)))
    with torch.no_grad():
        normed = language_model(model).norm(states).double()
    kept, free = set(image_pivots), [c for c in image if c not in image_pivots]
    pivots = sorted(image_pivots + text_pivots)
    rest = n - len(image_pivots)
    for j, p in enumerate(pivots):
        quota = rest // len(pivots) + (1 if j < rest % len(pivots) else 0)
        cos = {c: float(torch.nn.functional.cosine_similarity(normed[p], normed[c], dim=0)) for c in free}
        taken = sorted(free, key=lambda c: (cos[c], c))[:quota]
        kept.update(taken)
        free = [c for c in free if c not in taken]
    return sorted(kept), image_pivots


def _kept_vision(handle, inputs: dict, model) -> list[int]:
    """The input columns of the vision tokens the handle's one stage kept (one sample)."""
    (rec,) = handle.last_stages
    vis = _vision(model, inputs["input_ids"])[0]
    columns = rec.keep_index[0][rec.keep_index[0] >= 0]
    return [c for c in columns.tolist() if vis[c]]


# ---------------------------------------------------------------------------------------------- the tests
CASES = {
    # two images (32 vision tokens), text between them: 16 kept, 14 shared by 2 + 2 pivots (4, 4, 3, 3)
    "llava-two-images": ("llava", Sample(images=2, prefix=3, suffix=6), DART(layer=2, keep=0.5, pivots=2)),
    # at layer 1 (keys of layer 0), 10 of 32 kept: 3 image pivots and 7 picks among 6 pivots
    "llava-layer-1": ("llava", Sample(images=2, prefix=2, suffix=4), DART(layer=1, keep=0.3, pivots=3)),
    # two text tokens after the image: fewer text pivots than asked
    "llava-short-text": ("llava", Sample(images=1, prefix=3, suffix=1), DART(layer=3, keep=0.75, pivots=4)),
    # M-RoPE keys, the defaults: 11 of 49 kept, 7 picks for 8 pivots (1 each, the last text pivot none)
    "qwen2_vl-default": ("qwen2_vl", Sample(images=1, prefix=3, suffix=7, image_shape=(56, 56)), DART()),
    # an image and a video: every vision token is a candidate and a possible pivot
    "llava_next_video": ("llava_next_video", Sample(images=1, videos=1, prefix=2, suffix=5), DART(keep=0.4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kept_tokens_match_the_naive_reference(case):
    """Through ``withdraw`` (one prefill): the stage keeps every text token and exactly the naive reference's vision
    tokens, ``ceil(keep · V)`` of them; the layers from ``K`` on see those counts."""
    family, sample, method = CASES[case]
    model = _model(family)
    (inputs,) = make_singles(model, [sample])
    expected, _ = naive_dart(model, inputs, method)
    vision = int(_vision(model, inputs["input_ids"]).sum())
    with torch.no_grad(), withdraw(model, method=method) as handle:
        model(**inputs)
    assert _kept_vision(handle, inputs, model) == expected
    assert len(expected) == math.ceil(method.keep * vision - 1e-9) < vision
    text = inputs["input_ids"].shape[1] - vision
    assert handle.last_layer_tokens[0].tolist() == [[vision, text]] * method.layer + [[len(expected), text]] * (
        NUM_LAYERS - method.layer
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pivots_are_the_largest_key_l1_norms_of_layer_k_minus_1(family):
    """With ``ceil(keep · V) = pivots`` only the image pivots are kept: the vision tokens whose keys in layer ``K-1``
    (rotary applied, the KV cache's) have the largest L1 norm. On this prompt the other candidates (L2 norm, layer
    ``K``'s keys, keys before rotary, the smallest norms) pick other tokens, so the check tells them apart."""
    model = _model(family)
    sample = Sample(images=2, prefix=3, suffix=5) if family == "llava" else Sample(images=1, image_shape=(56, 56))
    (inputs,) = make_singles(model, [sample])
    vision = int(_vision(model, inputs["input_ids"]).sum())
    method = DART(layer=2, keep=3 / vision, pivots=3)
    kept, pivots = naive_dart(model, inputs, method)
    assert kept == sorted(pivots) and len(pivots) == 3
    with torch.no_grad(), withdraw(model, method=method) as handle:
        model(**inputs)
    assert _kept_vision(handle, inputs, model) == kept
    image = torch.nonzero(_vision(model, inputs["input_ids"])[0]).flatten().tolist()
    heads = model.config.get_text_config().num_attention_heads
    keys, _ = _prefill(model, inputs, 2)
    later, _ = _prefill(model, inputs, 3)
    layer = language_model(model).layers[1]
    _, before = _prefill(model, inputs, 1)  # the input of layer 1
    unrotated = layer.self_attn.k_proj(layer.input_layernorm(before)).detach()
    unrotated = unrotated.view(unrotated.shape[0], -1, layer.self_attn.head_dim).transpose(0, 1)
    l2 = [float(keys[:, t].norm()) for t in range(keys.shape[1])]
    for other in (l2, _l1(later, heads), _l1(unrotated, heads), [-x for x in _l1(keys, heads)]):
        assert sorted(_top(other, image, 3)) != kept


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prompt_only_decides_from_the_prompt(family):
    """Prompt + continuation under ``prompt_only``: the kept set is the prompt alone's (text pivots from columns up
    to the last prompt token), whatever the continuation; without it the continuation's tokens become text pivot
    candidates and the choice changes."""
    model = _model(family)
    sample = Sample(images=2, prefix=3, suffix=2) if family == "llava" else Sample(images=1, suffix=2,
                                                                                   image_shape=(56, 56))  # fmt: skip
    (prompt,) = make_singles(model, [sample])
    n = prompt["input_ids"].shape[1]
    method = DART(layer=2, keep=0.4, pivots=2)
    alone, _ = naive_dart(model, prompt, method)
    changed = []
    for tail in ((7, 8, 9), (100, 3, 51, 12)):
        full = prompt
        for token in tail:
            full = _extend(full, token)
        unrestricted, _ = naive_dart(model, full, method)
        with torch.no_grad(), withdraw(model, method=method) as handle:
            with handle.prompt_only(torch.tensor([n - 1])):
                model(**full)
            assert _kept_vision(handle, full, model) == alone
            (rec,) = handle.last_stages
            assert rec.keep_index[0].tolist()[-len(tail) :] == list(range(n, n + len(tail)))
            model(**full)
            assert _kept_vision(handle, full, model) == unrestricted
        changed.append(unrestricted != alone)
    assert any(changed)


def test_counts_and_quotas_derived_by_hand():
    """128 of 576 kept by default (the paper's main setting) from layer 2 on; each pivot's share of the budget left
    after the image pivots: 124 = 8 · 15 + 4 for 8 pivots, 7 for 8."""
    method = DART()
    assert (method.layer, method.pivots) == (2, 4) and method.stage_tokens(0, 576, 40) == (128, 40)
    assert method.layer_tokens(32, 576, 40) == [(576, 40)] * 2 + [(128, 40)] * 30
    assert DART(keep=0.5).layer_tokens(4, 15, 7) == [(15, 7)] * 2 + [(8, 7)] * 2  # ceil(7.5)
    assert method.quotas(124, 8) == [16] * 4 + [15] * 4 and method.quotas(7, 8) == [1] * 7 + [0]
    assert method.quotas(14, 4) == [4, 4, 3, 3] and method.quotas(0, 5) == [0] * 5
    assert DART(keep=1).stages() == () and DART(layer=None).stages() == () and method.stages() == (2,)
    assert DART(layer=None).layer_tokens(4, 10, 5) == [(10, 5)] * 4
    assert method.resolve(4) is method and DART(layer=None).resolve(4).stages() == ()


COUNTED: list = []
_Counted = reference.counting(DART, COUNTED)


@pytest.mark.parametrize(
    ("family", "sample", "params"),
    [
        ("llava", Sample(images=2, prefix=3, suffix=5), dict(keep=0.5, pivots=2)),  # similarities
        ("qwen2_vl", Sample(images=1, image_shape=(56, 56)), {}),  # M-RoPE, defaults: 11 > 4 pivots
        ("llava", Sample(images=1, prefix=3, suffix=5), {}),  # 4 of 16 kept = the pivots: no similarity
        ("llava", Sample(prefix=5), {}),  # text only: nothing to choose, nothing computed
    ],
)
def test_scoring_flops_equal_flop_counter(family, sample, params):
    """What ``select`` spends (FlopCounterMode, one sample) is ``scoring_flops`` of the realized counts, the hand
    formula, and what ``count_flops`` books as the prefill's reduction work."""
    model = _model(family)
    (inputs,) = make_singles(model, [sample])
    method = _Counted(**params)
    tokens = reference.counted_prefill(model, inputs, method, COUNTED)
    expected = method.scoring_flops(model.config, None, tokens)
    assert COUNTED == [expected]
    v, t = tokens[1]
    kept = math.ceil(method.keep * v - 1e-9)
    # hidden 32: 2 · pivots rows of similarities where pivots pick (the keys are layer K-1's own: no projection)
    by_hand = 2 * 2 * method.pivots * v * 32 if method.pivots < kept < v else 0
    assert expected == by_hand and (expected > 0) == (sample.images > 0 and kept > method.pivots)
    grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else None
    report = count_flops(
        model.config, SampleCounts(vision_tokens=v, text_tokens=t, vision_grids=grids), method, layer_tokens=tokens
    )
    assert report.prefill.reduction == expected


def test_scoring_flops_of_llava_1_5_by_hand():
    """LLaVA-1.5-7B (D 4096), 576 + 40 tokens: 8 pivot rows against 576 vision tokens (the keys are the layer's own);
    nothing where the pivots are all that is kept, nothing is dropped or the layer is past the last."""
    config = load_model_config("llava-1.5-7b")
    tokens = [(576, 40)] * 32
    assert DART().scoring_flops(config, None, tokens) == 2 * 8 * 576 * 4096
    assert DART(keep=4 / 576).scoring_flops(config, None, tokens) == 0  # pivots only
    assert DART(layer=32).scoring_flops(config, None, tokens) == 0
    assert DART().scoring_flops(config, None, [(0, 40)] * 32) == 0
    with pytest.raises(ValueError, match="needs the \\(vision, text\\) tokens"):
        DART().scoring_flops(config, None)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(keep=0), "dart keep must be a number in (0, 1] (the share of vision tokens kept), got 0"),
        (dict(keep=1.5), "dart keep must be a number in (0, 1]"),
        (dict(keep=True), "dart keep must be a number in (0, 1]"),
        (dict(pivots=0), "dart pivots must be an integer >= 1, got 0"),
        (dict(pivots=2.0), "dart pivots must be an integer >= 1, got 2.0"),
        (dict(pivots=True), "dart pivots must be an integer >= 1, got True"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, needle):
    with pytest.raises(ValueError) as err:
        DART(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        (0, "dart layer must be an integer in [1, 4] or None (its pivots are chosen by layer K-1's keys), got 0"),
        (5, "dart layer 5 is out of range: allowed 0..4 (L=4) or None"),
        ("2", "dart layer must be an integer in [0, 4] or None, got '2' (str)"),
    ],
)
def test_layer_is_checked_against_the_decoder(layer, needle):
    with pytest.raises(ValueError) as err:
        DART(layer=layer).resolve(NUM_LAYERS)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="dart layer"):  # withdraw checks it before any forward
        withdraw(_model("llava"), method="dart", layer=layer)


def test_registry_budget_candidates_and_label():
    method = make_method("dart", layer=3, keep=0.25, pivots=2)
    assert method == DART(layer=3, keep=0.25, pivots=2) and method.label == "dart K=3 keep=0.25 pivots=2"
    assert DART().label == "dart K=2 keep=0.222 pivots=4" and DART(layer=None).label == "dart keep=0.222 pivots=4"
    cands = method.budget_candidates(32)
    assert [c.keep for c in cands] == [i / 200 for i in range(1, 201)]
    assert all((c.layer, c.pivots) == (3, 2) for c in cands) and cands[-1].stages() == ()
    compute = [sum(v for v, _ in c.layer_tokens(32, 576, 40)) for c in cands]
    assert compute == sorted(compute) and compute[0] < compute[-1]
    assert DART.free_parameter == "keep" and DART.uses_previous_layer
