"""PruMerge / PruMerge+: the kept cells, merged values and realized counts against an independent naive reference,
cached generation against a naive decoder on that choice, hand-derived IQR counts and uniform samples, exact
scoring FLOPs, clear errors.

The reference takes the class token's attention from the eager vision tower's own ``output_attentions`` (the
weights of the layer that receives ``hidden_states[vision_feature_layer]``, mean over heads) and the keys from that
layer's ``k_proj`` on its input, counts outliers with numpy's percentiles and merges in plain Python loops; the
logits come from tests/reference.py (layers by hand, no cache) on that choice. The method under test runs under
SDPA (and eager) with the KV cache, same weights.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from reference import StageChoice, counting, decoder_inputs, naive_generate
from test_flops import _measure, _phase, _phase_with_reduction, _token_counts, _workload
from test_visionzip import _tower_units
from tiny_models import Sample, build_tiny_model, make_batch, make_singles

from vtw import withdraw
from vtw.flops import SampleCounts, count_flops
from vtw.grids import Grid, input_layouts
from vtw.methods import make_method
from vtw.methods.prumerge import PruMerge, outlier_count

NUM_LAYERS = 4
STEPS = 3
ATOL = 1e-4
GREEDY = dict(max_new_tokens=STEPS, do_sample=False)


@functools.cache
def _model(family: str, attn: str = "sdpa"):
    """The tiny model of ``family`` with a sharper vision tower (query/key weights x4: random CLIP attention is
    nearly uniform, so no patch would be an outlier); the same weights for both attention implementations."""
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("vision_tower" in name or "image_tower" in name or "video_tower" in name) and (
                "q_proj.weight" in name or "k_proj.weight" in name
            ):
                p.mul_(4.0)
    return model


# ------------------------------------------------------------------------------------------------ the reference
def _scores(model, tower, pixels):
    """Per tower input: the class token's attention to each patch ``(N, n)`` and the patches' keys ``(N, n, D)`` in
    the layer that receives ``hidden_states[vision_feature_layer]``, and those features ``(N, n, Dv)`` (what the
    projector receives)."""
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
    layers = tower.encoder.layers
    index = len(layers) + 1 + model.config.vision_feature_layer  # hidden_states[i]: the input of layer i
    layer = layers[index]
    attention = out.attentions[index][:, :, 0, 1:].mean(1)
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))[:, 1:]
    return attention, keys, out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _naive_kept(a: list[float], plus: bool, keep: float | None) -> list[int] | None:
    """The patches one unit keeps (outliers by attention, then PruMerge+'s stride samples), ``None``: whole."""
    n = len(a)
    q1, q3 = np.percentile(np.array(a, dtype=np.float64), [25, 75])
    outliers = sorted((i for i in range(n) if a[i] > q3 + 1.5 * (q3 - q1)), key=lambda i: (-a[i], i))
    room = n if keep is None else math.ceil(keep * n) - 1
    kept = outliers[:room]
    if plus:
        ratio = max(len(outliers), 1) / n
        stride = max(1, int(int(1 / ratio) / 3))
        while True:
            samples = [i for i in range(0, n, stride) if i not in kept]
            if len(samples) <= room - len(kept) or stride >= n:
                break
            stride += 1
        kept = kept + samples[: max(room - len(kept), 0)]
    return None if len(kept) + 1 >= n else kept


def _naive_unit(a, keys, x, method: PruMerge):
    """``None`` (whole) or ``({kept patch: merged feature}, feature of the pruned patches' token)``, merged on the
    features ``x`` ``(n, Dv)`` the projector receives."""
    kept = _naive_kept([float(v) for v in a], method.plus, method.keep)
    if kept is None:
        return None
    n, merged = len(a), {}
    for i in kept:
        sims = [(-float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0)), j) for j in range(n) if j != i]
        value = x[i].clone()
        for _, j in sorted(sims)[: method.neighbours]:
            value = value + a[j] * x[j]
        merged[i] = value
    pruned = torch.zeros_like(x[0])
    for j in range(n):
        if j not in kept:
            pruned = pruned + a[j] * x[j]
    return merged, pruned


def _naive_choice(model, inputs, method: PruMerge) -> tuple[StageChoice, int]:
    """The reference's stage-0 choice for one sample (kept columns in order, the pruned patches' tokens after their
    unit's last cell) and its vision token count."""
    embeds, _ = decoder_inputs(model, inputs)
    n_prompt = embeds.shape[1]
    keep = torch.ones(n_prompt, dtype=torch.bool)
    values, after = {}, {}
    towers, newlines = _tower_units(model, inputs)
    project = model.model.multi_modal_projector
    for tower, pixels, units in towers:
        attention, keys, features = _scores(model, tower, pixels)
        for row, cells, patches in units:
            out = _naive_unit(attention[row, patches], keys[row, patches], features[row, patches], method)
            if out is None:
                continue
            merged, pruned = out
            keep[cells] = False
            with torch.no_grad():
                for i, value in merged.items():
                    keep[cells[i]] = True
                    values[int(cells[i])] = project(value)
                after.setdefault(int(cells.max()), []).append(project(pruned))
    keep[newlines] = False  # the crop grids here all have crops of 2+ patches
    columns, added, out_values = [], [], []
    for c in range(n_prompt):
        if keep[c]:
            columns.append(c), added.append(False), out_values.append(values.get(c, embeds[0, c]))
        for value in after.get(c, []):
            columns.append(c), added.append(True), out_values.append(value)
    recorded = [a or c in values for c, a in zip(columns, added)]
    vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    vision += sum(added) - (n_prompt - int(keep.sum()))  # the newlines are image tokens too
    choice = StageChoice(0, torch.tensor(columns), torch.tensor(recorded), torch.stack(out_values),
                         torch.tensor(added))  # fmt: skip
    return choice, vision


# ------------------------------------------------------------------------------------------------ the method
def _generate(model, inputs, method):
    with torch.no_grad(), withdraw(model, method=method) as handle:
        handle.record_hidden = True
        out = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), torch.stack(out.logits, dim=1)[0], handle


SETTINGS = [
    PruMerge(neighbours=3),
    PruMerge(plus=True, neighbours=2),
    PruMerge(keep=0.2, neighbours=3),
    PruMerge(plus=True, keep=0.4, neighbours=4),
    PruMerge(),  # 32 neighbours: every other patch of these tiny units
]


@pytest.mark.parametrize(
    ("family", "sample"),
    [
        ("llava", Sample(images=3, prefix=3, suffix=4)),
        ("llava_next", Sample(images=1, prefix=2, suffix=3, image_shape=(40, 64))),  # 2 x 2 crops of 12 patches
        ("llava_next", Sample(images=1, image_shape=(32, 32), suffix=2)),  # 2 crops of 8 patches
    ],
)
def test_choice_counts_and_cached_generate_equal_the_naive_reference(family, sample):
    reference_model = _model(family, "eager")
    (inputs,) = make_singles(_model(family), [sample], seed=3)
    n_prompt = inputs["input_ids"].shape[1]
    for method in SETTINGS:
        choice, vision = _naive_choice(reference_model, inputs, method)
        assert len(choice.columns) < n_prompt, method  # something was reduced
        ref_tokens, ref_logits = naive_generate(reference_model, inputs, [choice], STEPS)
        for attn in ("sdpa", "eager"):
            tokens, logits, handle = _generate(_model(family, attn), inputs, method)
            (rec,) = handle.last_stages
            real = rec.keep_index[0] >= 0
            assert rec.keep_index[0][real].tolist() == choice.columns.tolist(), (method, attn)
            assert rec.extra[0][real].tolist() == choice.added.tolist(), (method, attn)
            got = rec.hidden[0][real]
            torch.testing.assert_close(got[choice.recorded], choice.values[choice.recorded], atol=1e-5, rtol=0)
            text = n_prompt - int((inputs["input_ids"][0] == reference_model.config.image_token_id).sum())
            assert handle.last_layer_tokens[0].tolist() == [[vision, text]] * NUM_LAYERS, (method, attn)
            assert tokens == ref_tokens, (method, attn)
            torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0, msg=f"{method.label} {attn}")


def test_the_reference_samples_have_outliers_and_whole_units():
    """The samples above exercise what the method decides: several outlier counts, zero included."""
    model = _model("llava", "eager")
    (inputs,) = make_singles(model, [Sample(images=3, prefix=3, suffix=4)], seed=3)
    attention, _, _ = _scores(model, model.model.vision_tower, inputs["pixel_values"])
    counts = [outlier_count(a) for a in attention]
    assert len(set(counts)) >= 2 and max(counts) >= 2, counts


def test_batch_with_different_images_equals_each_sample_alone():
    model = _model("llava_next")
    samples = [Sample(images=2, prefix=3, suffix=6, image_shape=(40, 64)), Sample(prefix=9, suffix=4),
               Sample(images=1, prefix=1, suffix=2, image_shape=(32, 32))]  # fmt: skip
    batch = make_batch(model, samples, seed=3)
    for method in (PruMerge(plus=True, neighbours=3), PruMerge(keep=0.3)):
        with torch.no_grad(), withdraw(model, method=method):
            out = model.generate(**batch, **GREEDY, output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits, dim=1)
        for i, single in enumerate(make_singles(model, samples, seed=3)):
            tokens, lg, _ = _generate(model, single, method)
            assert out.sequences[i, -STEPS:].tolist() == tokens, (method, i)
            torch.testing.assert_close(logits[i], lg, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ by hand
def test_outlier_count_by_hand():
    # n = 8: Q1 at rank 1.75 = 2.75, Q3 at rank 5.25 = 6.25, IQR 3.5: the bound is 6.25 + 5.25 = 11.5 (Q1's: 8)
    assert outlier_count(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100])) == 1
    assert outlier_count(torch.tensor([7.0, 2, 3, 4, 11.5, 6, 1, 5])) == 0  # on the bound: no outlier
    assert outlier_count(torch.tensor([7.0, 2, 3, 4, 11.6, 6, 1, 5])) == 1
    # n = 16: twelve zeros: Q1 = 0, Q3 at rank 11.25 = 0.25, the bound 0.625: 1, 2, 3 and 50 are outliers
    assert outlier_count(torch.tensor([0.0] * 12 + [1, 2, 3, 50])) == 4
    assert outlier_count(torch.full((9,), 0.3)) == 0
    scores = torch.rand(577, generator=torch.Generator().manual_seed(0)) ** 8
    q1, q3 = np.percentile(scores.double().numpy(), [25, 75])
    assert outlier_count(scores) == int((scores.double().numpy() > q3 + 1.5 * (q3 - q1)).sum()) > 0


def test_plus_adds_uniform_samples_and_the_cap_by_hand():
    a = torch.full((16,), 0.01)
    a[5], a[9] = 0.5, 0.3  # two outliers: PruMerge+'s stride is (16 // 2) // 3 = 2
    assert PruMerge().choose(a).tolist() == [5, 9]
    assert PruMerge(plus=True).choose(a).tolist() == [5, 9, 0, 2, 4, 6, 8, 10, 12, 14]
    # a cap of ceil(0.25 · 16) = 4 tokens: 3 patches; the stride grows to 9 (samples 0, 9: 9 is kept already)
    assert PruMerge(plus=True, keep=0.25).choose(a).tolist() == [5, 9, 0]
    assert PruMerge(keep=0.1).choose(a).tolist() == [5]  # 2 tokens: the higher outlier and the pruned ones' token
    assert PruMerge(keep=0.01).choose(a).tolist() == []
    b = torch.full((16,), 0.01)  # no outlier: PruMerge+ strides by (16 // 1) // 3 = 5
    assert PruMerge().choose(b).tolist() == []
    assert PruMerge(plus=True).choose(b).tolist() == [0, 5, 10, 15]
    c = torch.tensor([0.0] * 9 + [0.5, 0.6, 0.7])  # 3 outliers of 12: stride 1, 12 patches kept: whole
    assert PruMerge(plus=True).choose(c) is None and PruMerge().choose(c).tolist() == [11, 10, 9]


def test_expected_counts_and_budget_candidates():
    image = Grid(24, 24)  # LLaVA-1.5's 576 patches: the papers' averages
    assert PruMerge().grid_tokens(image) == 32 and PruMerge(plus=True).grid_tokens(image) == 144
    assert PruMerge(keep=0.1).grid_tokens(image) == 58 and PruMerge(keep=1.0).grid_tokens(image) == 576
    assert PruMerge().grid_tokens(Grid(4, 4, frames=3, lead=1)) == 3 * (1 + 1)
    assert PruMerge(keep=0.3).grid_tokens(Grid(4, 4, frames=2, lead=1)) == 2 * (1 + 5)
    crops = Grid(4, 8, newline=1, tiling=(1, 2, 4))  # two 4 x 4 crops, row newlines dropped
    assert PruMerge(keep=0.3).grid_tokens(crops) == 2 * 5
    cands = PruMerge(plus=True).budget_candidates(NUM_LAYERS)
    assert [c.keep for c in cands] == sorted(c.keep for c in cands) and cands[0].plus and cands[-1].keep == 1.0
    assert PruMerge.free_parameter in PruMerge().params() and PruMerge.acts_in == "vision_encoder"
    assert PruMerge(plus=True, keep=0.25).label == "prumerge+ keep=0.25"
    assert make_method("prumerge", plus="true") == PruMerge(plus=True)


def test_the_cap_bounds_the_realized_counts():
    model = _model("llava_next")
    (inputs,) = make_singles(model, [Sample(images=1, image_shape=(40, 64), suffix=3)], seed=3)
    (layout,) = input_layouts(model.config, inputs["input_ids"], inputs)
    vision, text = _token_counts(model, inputs["input_ids"])
    for keep in (0.05, 0.2, 0.5):
        method = PruMerge(plus=True, keep=keep)
        _, _, handle = _generate(model, inputs, method)
        declared = method.layer_tokens(NUM_LAYERS, vision, text, layout)
        realized = handle.last_layer_tokens[0].tolist()
        assert all(r[0] <= d[0] and r[1] == d[1] == text for r, d in zip(realized, declared)), (keep, realized)
    assert realized != declared  # a cap that binds nowhere: fewer tokens than declared


# ------------------------------------------------------------------------------------------------ FLOPs
COUNTED: list = []
_Counted = counting(PruMerge, COUNTED)


@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next"])
def test_scoring_flops_equal_flop_counter(family):
    model = _model(family)
    samples = [Sample(images=2), Sample(prefix=5)]
    samples += [Sample(images=1, videos=1)] if family == "video_llava" else []
    samples += [Sample(images=1, image_shape=(64, 40))] if family == "llava_next" else []
    batch = make_batch(model, samples)
    layouts = input_layouts(model.config, batch["input_ids"], batch)
    for method in (_Counted(), _Counted(plus=True, keep=0.3, neighbours=2)):
        COUNTED.clear()
        with torch.no_grad(), withdraw(model, method=method):
            model(**batch)
        expected = sum(method.scoring_flops(model.config, layout) for layout in layouts)
        assert COUNTED == [expected] and expected > 0
        if family == "llava":  # 2 images of 16 patches: the class token's attention and 16 x 16 cosines each
            d = model.config.vision_config.hidden_size
            assert expected == 2 * (2 * d * d + 2 * 17 * d * d + 2 * 17 * d + 2 * 16 * 16 * d)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_count_flops_on_the_realized_counts_equals_flop_counter_over_generate(family):
    model = _model(family)
    sample = Sample(images=1, prefix=3, suffix=5, image_shape=(40, 64) if family == "llava_next" else (32, 32))
    batch = make_batch(model, [sample])
    v, t = _token_counts(model, batch["input_ids"])
    (layout,) = input_layouts(model.config, batch["input_ids"], batch)
    method = PruMerge(plus=True, neighbours=3)
    _, _, handle = _generate(model, batch, method)
    realized = handle.last_layer_tokens[0].tolist()
    one, many = _measure(model, batch, 1, None, method), _measure(model, batch, 3, None, method)
    rep = count_flops(
        model.config,
        SampleCounts.of(_workload(model, batch), v, t, 3, vision_layout=layout),
        method,
        layer_tokens=realized,
    )
    assert rep.prefill.reduction == method.scoring_flops(model.config, layout) > 0
    assert _phase_with_reduction(rep.prefill, method) == one
    assert _phase(rep.decode) == {k: many[k] - one[k] for k in one}


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("family", "kwargs", "needle"),
    [
        ("llava", dict(plus="yes"), "prumerge plus must be true or false, got 'yes'"),
        ("llava", dict(plus=1), "prumerge plus must be true or false, got 1"),
        ("llava", dict(keep=0), "prumerge keep must be a number in (0, 1]"),
        ("llava", dict(keep=1.5), "got 1.5"),
        ("llava", dict(neighbours=0), "prumerge neighbours must be an integer >= 1, got 0"),
        ("llava", dict(neighbours=2.5), "prumerge neighbours must be an integer >= 1, got 2.5"),
        ("llava", dict(dominant=4), "takes keep, neighbours, plus; got unknown dominant"),
        ("qwen2_vl", {}, "prumerge cannot act on Qwen2-VL: it counts and ranks patches by the vision tower's"),
        ("llava_onevision", {}, "LLaVA-OneVision's tower (siglip_vision_model) has no class token"),
    ],
)
def test_bad_parameters_and_towers_without_a_class_token_fail_before_any_forward(family, kwargs, needle):
    model = build_tiny_model(family, num_layers=NUM_LAYERS)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as info:
        withdraw(model, method="prumerge", **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not calls and not model.model.__dict__.get("get_image_features")


def test_llava_next_video_takes_images_and_refuses_its_pooled_video_frames():
    model = _model("llava_next_video")
    (video,) = make_singles(model, [Sample(videos=1)])
    (image,) = make_singles(model, [Sample(images=1, image_shape=(64, 40))])
    with torch.no_grad(), withdraw(model, method="prumerge", plus=True):
        assert model(**image).logits.shape[1] < image["input_ids"].shape[1]
        with pytest.raises(ValueError, match="prumerge on LLaVA-NeXT-Video: its video frames are pooled"):
            model(**video)
