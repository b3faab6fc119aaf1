"""VisPruner / FasterVLM: the patches each unit keeps against a naive re-computation of the reference's loop (important
tokens by the class token's attention, then near-duplicates removed round by round among the rest), on one unit's
numbers and end to end on tiny models; ``important=1`` against FasterVLM's top-k; counts, removal rounds and scoring
FLOPs by hand at the paper's scale; clear errors.

The end-to-end reference takes the class token's attention from the eager vision tower's own ``output_attentions``
(the weights of the layer whose output the projector receives, mean over heads) and the features from its
``hidden_states[vision_feature_layer]``. Cached generation, batch == alone, no-op bit-identity, ``remove()``,
refusals and FLOPs against FlopCounterMode are the conformance suite's (tests/test_conformance.py).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from reference import decoder_inputs
from test_visionzip import _tower_units
from tiny_models import Sample, build_tiny_model, make_singles

from vtw import withdraw
from vtw.flops import SampleCounts, count_flops, load_model_config
from vtw.grids import Grid
from vtw.lmms.args import method_args
from vtw.methods import make_method
from vtw.methods.vispruner import VisPruner, removal_rounds

NUM_LAYERS = 4


@functools.cache
def _model(family: str, attn: str = "sdpa"):
    """The tiny model of ``family`` with a sharper vision tower (query/key weights x4: random CLIP attention is
    nearly uniform); the same weights for both attention implementations."""
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(t in name for t in ("vision_tower", "image_tower", "video_tower")) and (
                "q_proj.weight" in name or "k_proj.weight" in name
            ):
                p.mul_(4.0)
    return model


# ------------------------------------------------------------------------------------------------ the reference
def _naive_kept(attention: list[float], features: torch.Tensor, keep: float, important: float) -> list[int] | None:
    """The patches one unit keeps, as the reference's loop does (plain Python over one unit): ``None``: whole."""
    n = len(attention)
    total = min(n, math.ceil(keep * n - 1e-9))
    if total >= n:
        return None
    n_important = int(total * important + 1e-9)
    diverse = total - n_important
    ranked = sorted(range(n), key=lambda i: (-attention[i], i))
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    similarity = (unit @ unit.T).tolist()
    residual = ranked[n_important:]
    while diverse > 0:
        r = min(8, len(residual) - diverse)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        scores = [max(similarity[i][j] for j in b) for i in a]
        order = sorted(range(len(a)), key=lambda k: (-scores[k], k))
        residual = [a[k] for k in order[r:]] + b
    return sorted(ranked[:n_important] + (residual if diverse > 0 else []))


def _unit(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit's attention ``(n,)`` (a softmax) and features ``(n, 6)`` float64 (the method computes their cosines in
    float64 then, as the reference loop here: no near-tie flips): clusters of near-duplicates."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.softmax(3 * torch.randn(n, generator=g), 0)
    centres = torch.randn(max(n // 4, 1), 6, generator=g)
    features = centres[torch.randint(len(centres), (n,), generator=g)] + 0.3 * torch.randn(n, 6, generator=g)
    return attention, features.double()


@pytest.mark.parametrize(
    ("n", "keep", "important"),
    [(576, 64 / 576, 0.5), (576, 128 / 576, 0.75), (576, 32 / 576, 0.0), (16, 0.25, 0.5), (13, 0.5, 0.5),
     (12, 0.25, 0.34), (9, 0.2, 0.0), (40, 0.3, 0.6)],
)  # fmt: skip
def test_one_unit_keeps_what_the_reference_loop_keeps(n, keep, important):
    for seed in range(1 if n > 100 else 3):  # the 576-patch loop takes a second
        attention, features = _unit(n, seed)
        expected = _naive_kept(attention.tolist(), features, keep, important)
        got = VisPruner(keep=keep, important=important).reduce_unit(attention, None, features).kept
        assert got.tolist() == expected, (n, keep, important, seed)


def test_important_one_is_faster_vlm_top_k_and_ignores_the_features():
    for n, keep, seed in ((576, 58 / 576, 0), (576, 144 / 576, 1), (16, 0.4, 2)):
        attention, features = _unit(n, seed)
        top = torch.topk(attention, math.ceil(keep * n - 1e-9)).indices.sort().values
        for x in (features, torch.zeros_like(features), -features):
            assert torch.equal(VisPruner(keep=keep, important=1).reduce_unit(attention, None, x).kept, top)
        assert not torch.equal(VisPruner(keep=keep, important=0.5).reduce_unit(attention, None, features).kept, top)


def _naive_columns(model, inputs, keep: float, important: float, faster: bool = False) -> torch.Tensor:
    """The input columns one sample keeps (``faster``: each unit's ``torch.topk`` of the attention instead)."""
    n_prompt = inputs["input_ids"].shape[1]
    kept = torch.ones(n_prompt, dtype=torch.bool)  # text, class tokens and row newlines stay
    towers, _ = _tower_units(model, inputs)
    for tower, pixels, units in towers:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True, output_hidden_states=True)
        index = len(tower.encoder.layers) + model.config.vision_feature_layer  # the layer producing the features
        attention = out.attentions[index][:, :, 0, 1:].mean(1)
        features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        for row, cells, patches in units:
            a = attention[row, patches]
            chosen = _naive_kept(a.tolist(), features[row, patches], keep, important)
            if faster and chosen is not None:
                chosen = torch.topk(a, len(chosen)).indices.tolist()
            if chosen is not None:
                kept[cells] = False
                kept[cells[chosen]] = True
    return torch.nonzero(kept).flatten()


SETTINGS = [(0.25, 0.5), (0.5, 0.0), (0.4, 1.0), (64 / 576, 0.5), (0.75, 0.34)]


@pytest.mark.parametrize(
    ("family", "sample"),
    [
        ("llava", Sample(images=2, prefix=3, suffix=4)),
        ("video_llava", Sample(images=1, videos=1, prefix=2)),
        ("llava_next", Sample(images=1, image_shape=(40, 64))),  # 2 x 2 crops of 12 patches each, row newlines
    ],
)
def test_each_unit_keeps_the_reference_choice_with_untouched_values(family, sample):
    """The stage keeps the naive reference's columns (with ``important=1``: FasterVLM's top-k per unit), under SDPA
    and eager; the kept tokens carry the untouched model's decoder inputs (the projector ran on them alone)."""
    (inputs,) = make_singles(_model(family), [sample], seed=3)
    embeds, _ = decoder_inputs(_model(family), inputs)
    for keep, important in SETTINGS:
        expected = _naive_columns(_model(family, "eager"), inputs, keep, important)
        assert len(expected) < inputs["input_ids"].shape[1]
        if important == 1:
            assert torch.equal(expected, _naive_columns(_model(family, "eager"), inputs, keep, 1, faster=True))
        for attn in ("sdpa", "eager"):
            with torch.no_grad(), withdraw(_model(family, attn), method=VisPruner(keep, important)) as handle:
                handle.record_hidden = True
                _model(family, attn)(**inputs)
            (record,) = handle.last_stages
            assert record.keep_index[0].tolist() == expected.tolist(), (keep, important, attn)
            torch.testing.assert_close(record.hidden[0], embeds[0, expected], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ by hand
def test_removal_rounds_and_counts_by_hand():
    # 16 patches keep 4, 2 important: 14 left for 2 diverse; |A| caps the first round (7 of 14), then 4 of 7, 1 of 3
    assert removal_rounds(14, 2) == [7, 4, 1]
    assert removal_rounds(544, 32) == [8] * 64  # the paper's 32 + 32 of 576
    assert removal_rounds(10, 0) == [] and removal_rounds(5, 5) == []
    assert VisPruner().split(576) == (32, 32) and VisPruner(128 / 576, 0.75).split(576) == (96, 32)
    assert VisPruner(0.25, 0.34).split(12) == (1, 2) and VisPruner(0.95).split(16) is None
    assert VisPruner().grid_tokens(Grid(24, 24)) == 64
    assert VisPruner(0.25).grid_tokens(Grid(4, 4, frames=2, lead=1)) == 2 * (1 + 4)  # class tokens stay
    assert VisPruner(0.25).grid_tokens(Grid(4, 8, newline=1, tiling=(1, 2, 4))) == 2 * 4 + 4  # newlines stay
    assert VisPruner(0.25).grid_tokens(Grid(3, 8, newline=1, tiling=(1, 2, 4))) == 2 * 3 + 3  # unpadded crops: 12
    assert VisPruner(0.95).grid_tokens(Grid(4, 4, frames=3, lead=1)) == 3 * 17


def test_scoring_flops_of_llava_1_5_by_hand():
    """One 336 px image of LLaVA-1.5-7B (577 tower tokens of 1024) at the default 32 + 32 of 576: the class token's
    attention (its query, every key, one row of scores) and the cosines of the 544 patches left after the important
    ones, once."""
    config = load_model_config("llava-1.5-7b")
    d, s = 1024, 577
    attention = 2 * d * d + 2 * s * d * d + 2 * s * d
    rounds = 2 * 544 * 544 * d
    rep = count_flops(
        config, SampleCounts(vision_tokens=576, text_tokens=40, generated_tokens=1, vision_inputs=1), VisPruner()
    )
    assert rep.prefill.reduction == attention + rounds == 1_819_412_480
    faster = count_flops(
        config,
        SampleCounts(vision_tokens=576, text_tokens=40, generated_tokens=1, vision_inputs=1),
        VisPruner(important=1),
    )
    assert faster.prefill.reduction == attention  # FasterVLM compares nothing
    assert rep.prefill_decoder_tokens[0] == faster.prefill_decoder_tokens[0] == 64 + 40


def test_installs_nothing_where_every_unit_stays_whole():
    model = _model("video_llava")  # 16 patches per image and frame: ceil(0.95 · 16) = 16, ceil(15/16 · 16) = 15
    for keep, active in ((1.0, False), (0.95, False), (15 / 16, True)):
        with withdraw(model, method=VisPruner(keep=keep)) as handle:
            assert handle.active is active, keep


def test_defaults_label_budget_and_config_values():
    assert VisPruner().keep * 576 == pytest.approx(64) and VisPruner().important == 0.5
    assert VisPruner().label == "vispruner keep=0.111 important=0.5"
    cands = VisPruner(important=1).budget_candidates(NUM_LAYERS)
    assert [c.keep for c in cands] == sorted(c.keep for c in cands) and cands[-1].keep == 1.0
    assert {c.important for c in cands} == {1.0} and VisPruner.free_parameter == "keep"
    assert make_method("vispruner", **method_args("vispruner", {"important": "1", "keep": "0.25"})) == VisPruner(
        0.25, 1.0
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(keep=0), "vispruner keep must be a number in (0, 1]"),
        (dict(keep=1.5), "got 1.5"),
        (dict(important=1.5), "vispruner important must be a number in [0, 1]"),
        (dict(important=-0.1), "got -0.1"),
        (dict(important=True), "1: FasterVLM), got True"),
        (dict(dominant=4), "takes important, keep; got unknown dominant"),
    ],
)
def test_bad_parameters_fail_in_one_line(kwargs, needle):
    with pytest.raises(ValueError) as info:
        make_method("vispruner", **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_round_by_hand_with_ties_to_the_earlier_token():
    """8 patches, keep 6, none important: one round over the attention order, A = its tokens 0 2 4 6, B = 1 3 5 7
    (all ``(0, 1)``), removes the 2 of A nearest to B: the duplicate (cosine 1), then of the two at ``1/sqrt 2`` the
    earlier in the round's order."""
    features = torch.tensor([[0.0, 1], [0, 1], [1, 1], [0, 1], [1, 1], [0, 1], [1, 0], [0, 1]])
    method = VisPruner(keep=0.75, important=0.0)
    assert method.reduce_unit(torch.linspace(0.2, 0.1, 8), None, features).kept.tolist() == [1, 3, 4, 5, 6, 7]
    # the reversed order: A = 7 5 3 1, B = 6 4 2 0 (all (1, 1)): 7 goes, then 5 of the three tied at 1/sqrt 2
    features = torch.tensor([[1.0, 1], [1, 0], [1, 1], [0, 1], [1, 1], [0, 1], [1, 1], [1, 1]])
    assert method.reduce_unit(torch.linspace(0.1, 0.2, 8), None, features).kept.tolist() == [0, 1, 2, 3, 4, 6]
