"""``divprune``: which tokens it keeps (against a naive greedy max-min search), how many (hand-derived and as
``layer_tokens`` declares them), its scoring FLOPs, ties, and bad ``keep`` values. Cached generation vs naive
decoding, batch == alone, the no-op and FLOPs vs FlopCounterMode are the generic conformance suite's.

The reference splits each image / video into its sets on its own, not through :mod:`vtw.grids`: the decoder's input
embeddings at the placeholder tokens (the projected features), cut per family (LLaVA-1.5: one image; anyres: the
first ``side²`` tokens, then the rest, whose newline tokens are found by equality with ``image_newline``; Qwen: a
video's ``t`` equal slices; Video-LLaVA: per frame a class token, then the patches); then a plain float64 loop.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_pool import _runs
from test_withdraw import _causal, _lm_inputs, _rotary
from tiny_models import IMAGE_ID, VIDEO_ID, Sample, build_tiny_model, make_singles

import vtw
from vtw import withdraw
from vtw.flops import SampleCounts, count_flops
from vtw.grids import Grid, SampleLayout, input_layouts
from vtw.methods import make_method
from vtw.methods.divprune import DivPrune, cosine_distances, max_min_diverse
from vtw.methods.ranking import KEEP_GRID

NUM_LAYERS = 2
ATOL = 1e-4


@functools.cache
def _model(family):
    return build_tiny_model(family, num_layers=NUM_LAYERS)


def _qwen_inputs(model) -> dict:
    """Qwen2-VL: one image of 8 x 16 patches, then one video of ``t = 2`` slices of 8 x 8 patches."""
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(1)
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    image, video = torch.tensor([[1, 8, 16]]), torch.tensor([[2, 8, 8]])
    merge = vc.spatial_merge_size**2
    ids = [5, 6, 7] + [IMAGE_ID] * (128 // merge) + [8] + [VIDEO_ID] * (128 // merge) + [9, 10, 11]
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": image,
            "pixel_values": torch.rand(128, dim, generator=g) * 2 - 1, "video_grid_thw": video,
            "pixel_values_videos": torch.rand(128, dim, generator=g) * 2 - 1,
            "mm_token_type_ids": (ids == IMAGE_ID).int() + 2 * (ids == VIDEO_ID).int()}  # fmt: skip


def _inputs(family) -> dict:
    model = _model(family)
    if family == "qwen2_vl":
        return _qwen_inputs(model)
    videos = int(family in ("video_llava", "llava_onevision"))
    (inputs,) = make_singles(model, [Sample(images=1, videos=videos, prefix=3, suffix=4, image_shape=(32, 64))])
    return inputs


def _sets(model, inputs: dict, embeds: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """``(sets, newline groups)``: the input positions of each set of tokens DivPrune chooses from, and per set
    the row newlines that go with it (module docstring)."""
    family, cfg, ids = vtw.get_family(model).model_type, model.config, inputs["input_ids"][0]
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size if "qwen" not in family else None
    sets, newlines = [], []
    for token_id, kind in ((IMAGE_ID, "image"), (VIDEO_ID, "video")):
        for run in _runs(ids == token_id) if token_id in ids else []:
            run = run.tolist()
            if family == "llava" or (kind == "image" and family in ("video_llava", "qwen2_vl")):
                parts = [run]
            elif family == "qwen2_vl":
                t = int(inputs["video_grid_thw"][0, 0])
                parts = [run[i * len(run) // t : (i + 1) * len(run) // t] for i in range(t)]
            elif family == "video_llava":  # per frame: the class token (kept), then the patches
                per = len(run) // inputs["pixel_values_videos"].shape[1]
                parts = [run[i + 1 : i + per] for i in range(0, len(run), per)]
            else:  # llava_next, llava_onevision: newline tokens are image_newline's own values
                is_newline = [bool(torch.equal(embeds[0, p], model.model.image_newline)) for p in run]
                cells = [p for p, nl in zip(run, is_newline) if not nl]
                if kind == "image":
                    parts = [cells[: side * side], cells[side * side :]]
                    newlines.extend([[], [p for p, nl in zip(run, is_newline) if nl]])
                    sets.extend(parts)
                    continue
                frames = inputs["pixel_values_videos"].shape[1]  # OneVision: its one trailing newline stays
                parts = [cells[i * len(cells) // frames : (i + 1) * len(cells) // frames] for i in range(frames)]
            sets.extend(parts)
            newlines.extend([[] for _ in parts])
    return sets, newlines


def _greedy(x: np.ndarray, count: int) -> list[int]:
    """Naive max-min diversity on cosine distance over the rows of ``x`` ``(n, D)``: ``count`` indices, sorted."""
    n = len(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - unit @ unit.T
    picked = [max(range(n), key=lambda j: min(d[i, j] for i in range(n) if i != j))]  # max: the first of ties
    while len(picked) < count:
        rest = [j for j in range(n) if j not in picked]
        picked.append(max(rest, key=lambda j: min(d[p, j] for p in picked)))
    return sorted(picked)


def _reference_kept(model, inputs: dict, keep: float, embeds: torch.Tensor) -> list[int]:
    """The input positions the reference keeps."""
    dropped = set()
    for cells, newlines in zip(*_sets(model, inputs, embeds)):
        count = math.ceil(Fraction(str(keep)) * len(cells))
        if count < len(cells):
            chosen = {cells[j] for j in _greedy(embeds[0, cells].double().numpy(), count)}
            dropped |= (set(cells) - chosen) | set(newlines)
    return [p for p in range(inputs["input_ids"].shape[1]) if p not in dropped]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "video_llava", "llava_onevision"])
def test_keeps_the_naive_greedy_choice_and_the_declared_counts(family):
    model, inputs = _model(family), _inputs(family)
    embeds, pos = _lm_inputs(model, inputs)
    lm = vtw.language_model(model)
    cos, sin, mpos = _rotary(lm, embeds, pos)
    for keep in (0.3, 0.55):
        kept = _reference_kept(model, inputs, keep, embeds)
        with torch.no_grad(), withdraw(model, method="divprune", keep=keep) as handle:
            logits = model(**inputs).logits[0]
        assert handle.last_keep_index[0].tolist() == kept, (family, keep)
        index = torch.tensor(kept)
        h, rotary = embeds[:, index], (cos[..., index, :], sin[..., index, :])
        with torch.no_grad():
            for layer in lm.layers:
                h = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_embeddings=rotary,
                          position_ids=mpos[..., index], past_key_values=None, use_cache=False)  # fmt: skip
            torch.testing.assert_close(logits, model.lm_head(lm.norm(h))[0], atol=ATOL, rtol=0)
        vision = torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE_ID, VIDEO_ID]))
        (layout,) = input_layouts(model.config, inputs["input_ids"], inputs)
        declared = DivPrune(keep=keep).layer_tokens(NUM_LAYERS, int(vision.sum()), int((~vision).sum()), layout)
        seen = (int(vision[index].sum()), int((~vision[index]).sum()))
        assert declared == [seen] * NUM_LAYERS, (family, keep)


def test_grid_counts_are_ceil_per_frame_hand_derived():
    assert DivPrune(keep=0.098).grid_tokens(Grid(24, 24)) == 57  # ceil(56.448); the reference's round: 56
    assert DivPrune(keep=0.3).grid_tokens(Grid(10, 1)) == 3  # 0.3 · 10 is 3 exactly
    assert DivPrune(keep=0.5).grid_tokens(Grid(5, 7, newline=1, tiling=(1, 2, 4))) == 18  # the 5 newlines go
    assert DivPrune(keep=0.25).grid_tokens(Grid(16, 16, frames=8, lead=1)) == 8 * (1 + 64)  # class tokens stay
    assert DivPrune(keep=0.1).grid_tokens(Grid(7, 7, frames=4, trail=1)) == 4 * 5 + 1  # the trailing newline stays
    assert DivPrune(keep=0.9).grid_tokens(Grid(2, 2, newline=1)) == 6  # ceil(3.6) = 4: untouched, newlines too


def test_scoring_flops_hand_derived_and_in_the_flops_model():
    model = _model("llava_onevision")
    layout = SampleLayout(images=(Grid(4, 4), Grid(4, 8, newline=1, tiling=(1, 2, 4))),
                          videos=(Grid(2, 2, frames=2, trail=1),))  # fmt: skip
    d = 32  # the tiny decoder's hidden size
    assert model.config.get_text_config().hidden_size == d
    assert DivPrune(keep=0.3).scoring_flops(model.config, layout) == 2 * d * (16**2 + 32**2 + 2 * 4**2)
    assert DivPrune(keep=0.9).scoring_flops(model.config, layout, [1, 2]) == 2 * d * (16**2 + 32**2)  # 4 stay
    with pytest.raises(ValueError, match="give the sample's layout"):
        DivPrune(keep=0.3).scoring_flops(model.config, None)
    report = count_flops(
        model.config,
        SampleCounts(vision_tokens=layout.tokens, text_tokens=7, vision_inputs=3, video_frames=2, vision_layout=layout),
        DivPrune(keep=0.3),
    )
    assert report.prefill.reduction == 2 * d * (16**2 + 32**2 + 2 * 4**2)
    assert report.prefill_decoder_tokens == (5 + 10 + 2 * 2 + 1 + 7,) * model.config.get_text_config().num_hidden_layers


def _unit(degrees) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1)


def _picks(x: torch.Tensor, count: int) -> list[int]:
    """What DivPrune picks of the tokens ``x`` ``(n, D)`` (one set)."""
    return max_min_diverse(cosine_distances(x)[None], count)[0].tolist()


def test_first_pick_ties_and_repeats_hand_derived():
    # nearest other token: 0°, 10°, 20° -> 10° away, 100° -> 80°: 100° first; then 0° (100° away), then 20°
    assert _picks(_unit([0, 10, 20, 100]), 3) == [0, 2, 3]
    # norms do not count: 3 x the 20° token changes nothing (a dot product would pick 10°, not 20°)
    x = _unit([0, 10, 20, 100]) * torch.tensor([[1.0], [1.0], [3.0], [1.0]], dtype=torch.float64)
    assert _picks(x, 3) == [0, 2, 3]
    # every nearest other is 90° away: the first token; then 180°; then 90° and 270° tie: the earlier
    assert _picks(_unit([0, 90, 180, 270]), 3) == [0, 1, 2]
    # a duplicate is picked once: all three tokens, each once
    assert _picks(_unit([0, 0, 90]), 3) == [0, 1, 2]


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, True, "0.5", None, float("nan")])
def test_bad_keep_is_refused(keep):
    with pytest.raises(ValueError, match=r"divprune keep must be a number in \(0, 1\]"):
        make_method("divprune", keep=keep)


def test_keep_one_installs_nothing_and_budget_runs_the_keep_grid():
    model = _model("llava")
    with withdraw(model, method="divprune", keep=1) as handle:
        assert not handle.active and DivPrune(keep=1).stages() == ()
    cands = DivPrune().budget_candidates(NUM_LAYERS)
    assert [c.keep for c in cands] == list(KEEP_GRID) and cands[-1].label == "divprune keep=1"
    assert DivPrune().keep == 0.098 and DivPrune.free_parameter == "keep"
