"""``dycoke`` (DyCoke's temporal token merging): which video tokens it keeps, against a naive re-computation written
here from the reference code's behaviour (KD-TAO/DyCoke ``dycole_ttm``), on a tiny model of every video family and on
the shipped tiny Video-LLaVA with a ``vtw_synthvideo`` clip; how many (hand-derived and as ``layer_tokens`` declares
them); its scoring FLOPs (hand-derived, and FlopCounterMode over ``select``); bad values; refusals; no-ops. Cached
generation vs naive decoding, batch == alone and FLOPs of whole runs are the generic conformance suite's.

The reference's pairing, per window of four frames ``i..i+3`` (the naive reference spells it out for four and
builds other windows level by level, as the reference's two passes do: pairs of neighbours, then every second
frame): ``i`` kept whole; ``i+1`` compared with ``i``, ``i+2`` with ``i``, ``i+3`` with ``i+2``; the same cell of
both frames (cosine similarity), the original tokens of both; the most similar tokens of the later frame dropped.
The frames of each video are cut here from the placeholder run (not through :mod:`vtw.grids`): Video-LLaVA per frame
a class token then the patches, OneVision one trailing newline, Qwen ``t`` equal slices.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import pytest
import torch
from reference import counting
from test_pool import _runs
from test_withdraw import _lm_inputs
from tiny_models import IMAGE_ID, VIDEO_ID, Sample, _image_inputs, _video_inputs, build_tiny_model, collate

import vtw
from vtw import withdraw
from vtw.flops import SampleCounts, count_flops
from vtw.grids import Grid, SampleLayout, input_layouts
from vtw.methods import make_method
from vtw.methods.dycoke import DEFAULT_KEEP, DyCoke, compared_frame
from vtw.methods.ranking import KEEP_GRID

NUM_LAYERS = 2
#: frames per video of each tiny family (Video-LLaVA's tower takes 8; Qwen: 2 per temporal patch, so 5 slices):
#: full windows and a partial last one
FRAMES = {"video_llava": 8, "llava_onevision": 7, "llava_next_video": 6, "qwen2_vl": 10, "qwen2_5_vl": 10}


@functools.cache
def _model(family):
    return build_tiny_model(family, num_layers=NUM_LAYERS)


@functools.cache
def _inputs(family) -> dict:
    """One prompt: text, an image, text, a video of ``FRAMES[family]`` frames, text."""
    model = _model(family)
    g = torch.Generator().manual_seed(3)
    images, (image_counts,) = _image_inputs(family, model, [Sample(images=1)], g)
    videos, (video_counts,) = _video_inputs(family, model, [Sample(videos=1)], g, frames=FRAMES[family])
    ids = torch.tensor([[5, 6, 7] + [IMAGE_ID] * image_counts[0] + [8] + [VIDEO_ID] * video_counts[0] + [9, 10, 11]])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **images, **videos}
    if "qwen" in family:
        out["mm_token_type_ids"] = (ids == IMAGE_ID).int() + 2 * (ids == VIDEO_ID).int()
    return collate([out])


def _frames(family, inputs: dict) -> list[list[int]]:
    """The input positions of each frame's grid cells of the prompt's video (module docstring)."""
    (run,) = _runs(inputs["input_ids"][0] == VIDEO_ID)
    run = run.tolist()
    if "qwen" in family:
        count = int(inputs["video_grid_thw"][0, 0])
    else:
        count = inputs["pixel_values_videos"].shape[1]
        run = run[:-1] if family == "llava_onevision" else run  # its one trailing newline stays
    per = len(run) // count
    frames = [run[f * per : (f + 1) * per] for f in range(count)]
    return [f[1:] for f in frames] if family == "video_llava" else frames  # the class token stays


def _pairs(count: int, window: int) -> list[tuple[int, int]]:
    """``(frame, the frame it is compared with)`` of a video of ``count`` frames, in time order."""
    out = []
    for start in range(0, count, window):
        if window == 4:  # the reference: pairs (i, i+1), (i+2, i+3), then (i, i+2)
            pairs = [(start + 1, start), (start + 2, start), (start + 3, start + 2)]
        else:  # level by level: stride 1 pairs neighbours, stride 2 every second frame, ...
            pairs, stride = [], 1
            while stride < window:
                pairs += [(start + o, start + o - stride) for o in range(stride, window, 2 * stride)]
                stride *= 2
        out += [(f, r) for f, r in pairs if f < min(start + window, count)]
    return sorted(out)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _naive_dropped(tokens: torch.Tensor, window: int, keep=None, threshold=None) -> set[tuple[int, int]]:
    """``{(frame, cell)}`` dropped of one video's tokens ``(F, n, D)``: plain loops (module docstring)."""
    count, cells = tokens.shape[:2]
    pairs = _pairs(count, window)
    if keep is not None:  # ceil(keep · F · n) kept: the first frames, the rest shared evenly in time order
        total = math.ceil(Fraction(str(keep)) * count * cells)
        room = min(max(total - (count - len(pairs)) * cells, 0), len(pairs) * cells)
    dropped = set()
    for i, (f, r) in enumerate(pairs):
        similarity = [_cosine(tokens[f, c], tokens[r, c]) for c in range(cells)]
        if threshold is not None:
            dropped |= {(f, c) for c in range(cells) if similarity[c] > threshold}
            continue
        kept = room // len(pairs) + (1 if i < room % len(pairs) else 0)
        least = sorted(range(cells), key=lambda c: (similarity[c], c))[:kept]  # ties: the earlier cell
        dropped |= {(f, c) for c in range(cells) if c not in least}
    return dropped


def _naive_kept(family, inputs: dict, embeds: torch.Tensor, **params) -> list[int]:
    """The input positions the naive reference keeps: every position but the dropped video cells."""
    frames = _frames(family, inputs)
    tokens = torch.stack([embeds[0, f] for f in frames])
    dropped = {frames[f][c] for f, c in _naive_dropped(tokens, params.pop("window", 4), **params)}
    return [p for p in range(inputs["input_ids"].shape[1]) if p not in dropped]


def _midpoint_threshold(family, inputs, embeds) -> float:
    """A threshold halfway between two neighbouring similarities of the prompt's compared cells (near the median):
    drops some, keeps some, and is no similarity itself (float32 vs float64 rounding cannot cross it)."""
    frames = _frames(family, inputs)
    values = sorted(_cosine(embeds[0, frames[f][c]], embeds[0, frames[r][c]])
                    for f, r in _pairs(len(frames), 4) for c in range(len(frames[0])))  # fmt: skip
    mid = len(values) // 2
    assert values[mid] - values[mid - 1] > 1e-6, values
    return (values[mid - 1] + values[mid]) / 2


@pytest.mark.parametrize("family", list(FRAMES))
def test_keeps_the_naive_choice_and_the_declared_counts(family):
    model, inputs = _model(family), _inputs(family)
    embeds, _ = _lm_inputs(model, inputs)
    vision = torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE_ID, VIDEO_ID]))
    counts = (int(vision.sum()), int((~vision).sum()))
    (layout,) = input_layouts(model.config, inputs["input_ids"], inputs)
    threshold = _midpoint_threshold(family, inputs, embeds)
    settings = [dict(keep=0.3), dict(keep=0.6), dict(keep=0.4, window=2), dict(keep=0.5, window=3),
                dict(threshold=threshold)]  # fmt: skip
    for params in settings:
        kept = _naive_kept(family, inputs, embeds, **params)
        assert len(kept) < inputs["input_ids"].shape[1], (family, params)  # the setting drops something
        method = DyCoke(**params)
        with torch.no_grad(), withdraw(model, method=method) as handle:
            model(**inputs)
        assert handle.last_keep_index[0].tolist() == kept, (family, params)
        seen = (int(vision[kept].sum()), int((~vision[kept]).sum()))
        assert handle.last_layer_tokens[0].tolist() == [list(seen)] * NUM_LAYERS
        declared = method.layer_tokens(NUM_LAYERS, *counts, layout)
        if "threshold" in params:  # declared: the whole video, an upper bound
            assert declared == [counts] * NUM_LAYERS and method.counts_depend_on_data
        else:
            assert declared == [seen] * NUM_LAYERS and not method.counts_depend_on_data


def test_an_image_only_prompt_is_unchanged():
    model = _model("llava_onevision")
    inputs = _inputs("llava_onevision")
    image_only = {k: v for k, v in inputs.items() if "video" not in k}
    keep = inputs["input_ids"][0] != VIDEO_ID
    image_only["input_ids"], image_only["attention_mask"] = (
        inputs["input_ids"][:, keep],
        inputs["attention_mask"][:, keep],
    )
    with torch.no_grad():
        plain = model(**image_only).logits
        with withdraw(model, method=DyCoke(keep=0.1)) as handle:
            assert handle.active
            reduced = model(**image_only).logits
    assert handle.last_keep_index[0].tolist() == list(range(image_only["input_ids"].shape[1]))
    torch.testing.assert_close(reduced, plain, atol=1e-5, rtol=0)


def test_pairing_hand_derived():
    assert [compared_frame(f, 4) for f in range(10)] == [None, 0, 0, 2, None, 4, 4, 6, None, 8]
    assert [compared_frame(f, 2) for f in range(5)] == [None, 0, None, 2, None]
    assert [compared_frame(f, 8) for f in range(8)] == [None, 0, 0, 2, 0, 4, 4, 6]
    assert [compared_frame(f, 3) for f in range(6)] == [None, 0, 0, None, 3, 3]
    assert [compared_frame(f, 1) for f in range(3)] == [None, None, None]
    for window in (2, 3, 4, 5, 8):
        assert [(f, compared_frame(f, window)) for f in range(11) if compared_frame(f, window) is not None] == _pairs(
            11, window
        )


def test_counts_hand_derived():
    frames = Grid(4, 4, frames=8, lead=1)  # Video-LLaVA-like: 8 frames of a class token and 16 cells
    assert DyCoke(keep=0.5).frame_counts(8, 16) == [6, 6, 5, 5, 5, 5]  # 64 kept: 32 first, 32 over six frames
    assert DyCoke(keep=0.5).grid_tokens(frames) == 8 + 64
    assert DyCoke(keep=0.1).grid_tokens(frames) == 8 + 32  # ceil(12.8) < the first frames: those stay
    assert DyCoke().grid_tokens(frames) == 8 + 61 and DyCoke().keep == DEFAULT_KEEP  # ceil(0.475 · 128)
    partial = Grid(2, 2, frames=5, trail=1)  # a window of 4 and one of 1: 3 compared frames, the newline stays
    assert DyCoke(keep=0.5).frame_counts(5, 4) == [1, 1, 0] and DyCoke(keep=0.5).grid_tokens(partial) == 10 + 1
    assert DyCoke(keep=0.8, window=2).frame_counts(5, 4) == [2, 2]  # 16 kept: 3 first frames (12), 2 compared
    assert DyCoke(keep=0.99).grid_tokens(frames) == frames.tokens - 1  # ceil(126.72) = 127: one cell goes
    assert DyCoke(keep=0.999).frame_counts(8, 16) is None  # ceil(127.9) = 128: nothing goes
    assert DyCoke(threshold=0.9).grid_tokens(frames) == frames.tokens  # declared: an upper bound
    assert DyCoke(keep=0.1).grid_tokens(Grid(4, 4, frames=1)) == 16  # one frame (an image, a Qwen t = 1 video)
    assert DyCoke(keep=0.1, window=1).grid_tokens(frames) == frames.tokens


def test_scoring_flops_hand_derived_in_the_flops_model_and_counted():
    model = _model("llava_onevision")
    d = model.config.get_text_config().hidden_size
    layout = SampleLayout(images=(Grid(4, 4), Grid(4, 8, newline=1, tiling=(1, 2, 4))),
                          videos=(Grid(2, 2, frames=5, trail=1),))  # fmt: skip
    assert DyCoke(keep=0.5).scoring_flops(model.config, layout) == 2 * d * 3 * 4  # 3 compared frames of 4 cells
    assert DyCoke(threshold=0.5).scoring_flops(model.config, layout) == 2 * d * 3 * 4
    assert DyCoke(keep=0.999).scoring_flops(model.config, layout) == 0  # nothing goes: nothing computed
    with pytest.raises(ValueError, match="give the sample's layout"):
        DyCoke().scoring_flops(model.config, None)
    report = count_flops(
        model.config,
        SampleCounts(vision_tokens=layout.tokens, text_tokens=7, vision_inputs=3, video_frames=5, vision_layout=layout),
        DyCoke(keep=0.5),
    )
    assert report.prefill.reduction == 2 * d * 3 * 4
    for family in ("video_llava", "qwen2_vl"):
        model, inputs = _model(family), _inputs(family)
        (layout,) = input_layouts(model.config, inputs["input_ids"], inputs)
        for method in (DyCoke(keep=0.3), DyCoke(threshold=0.5, window=2)):
            sink = []
            counted = counting(DyCoke, sink)(**method.params())
            with torch.no_grad(), withdraw(model, method=counted):
                model(**inputs)
            compared = sum(1 for f in range(FRAMES[family] // (2 if "qwen" in family else 1))
                           if compared_frame(f, method.window) is not None)  # fmt: skip
            cells = layout.videos[0].rows * layout.videos[0].cols
            assert sink == [method.scoring_flops(model.config, layout)] == [2 * d * compared * cells], family


@pytest.mark.parametrize(
    ("params", "message"),
    [(dict(keep=0), r"dycoke keep must be a number in \(0, 1\]"), (dict(keep=True), "dycoke keep"),
     (dict(threshold=1.5), r"threshold must be a cosine similarity in \[-1, 1\], got 1.5"),
     (dict(threshold=True), "threshold"), (dict(threshold="0.9"), "threshold"),
     (dict(keep=0.5, threshold=0.9), "keep or threshold, not both"),
     (dict(window=0), "dycoke window must be an integer >= 1, got 0"), (dict(window=2.0), "dycoke window"),
     (dict(window=True), "dycoke window")],
)  # fmt: skip
def test_bad_values_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        make_method("dycoke", **params)


def test_families_without_video_are_refused_and_the_others_taken():
    for family in ("llava", "llava_next"):
        config = _model(family).config
        display = vtw.get_family(config).display
        with pytest.raises(ValueError, match=f"dycoke cannot act on {display}: .* takes no video"):
            DyCoke().check_supported(config)
        with pytest.raises(ValueError, match="dycoke cannot act"):
            withdraw(_model(family), method="dycoke")
    for family in FRAMES:
        DyCoke().check_supported(_model(family).config, video=True)


def test_no_ops_install_nothing_and_the_budget_runs_the_keep_grid():
    model = _model("video_llava")
    for params in (dict(keep=1), dict(window=1), dict(threshold=1.0)):
        with withdraw(model, method=DyCoke(**params)) as handle:
            assert not handle.active and DyCoke(**params).stages() == (), params
    assert DyCoke(threshold=0.99).stages() == (0,)
    cands = DyCoke(threshold=0.9, window=2).budget_candidates(NUM_LAYERS)
    assert [c.keep for c in cands] == list(KEEP_GRID) and {(c.threshold, c.window) for c in cands} == {(None, 2)}
    assert DyCoke.free_parameter == "keep" and cands[-1].label == "dycoke keep=1 window=2"
    assert DyCoke(threshold=0.9).label == "dycoke threshold=0.9" and DyCoke().label == "dycoke keep=0.475"


# ------------------------------------------------------------------------------ the shipped tiny Video-LLaVA
@functools.cache
def _shipped():
    from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

    from vtw.pipeline.resolvers import asset_path

    path = asset_path("tiny-video-llava")
    model = VideoLlavaForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


def test_shipped_tiny_video_llava_on_a_synthvideo_clip():
    """The first ``vtw_synthvideo`` test item (its clip rendered, its prompt as the lmms-eval model writes it): the
    kept positions are the naive reference's, ties allowed for (the clips' flat background repeats tokens exactly):
    each compared frame keeps its share, and no kept cell is more similar than a dropped one of its frame."""
    from vtw.synthvideo.generator import make_item
    from vtw.synthvideo.tiny import prompt_text

    model, processor = _shipped()
    item = make_item("test", 0)
    inputs = processor(text=[prompt_text(processor, item)], videos=[item.render()], return_tensors="pt")
    embeds, _ = _lm_inputs(model, inputs)
    frames = _frames("video_llava", inputs)
    assert len(frames) == 8 and len(frames[0]) == 16  # 8 frames of 4 x 4 patches (and a class token each)
    with torch.no_grad(), withdraw(model, method=DyCoke(keep=0.5)) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    kept = set(handle.last_keep_index[0].tolist())
    assert kept >= {p for p in range(inputs["input_ids"].shape[1]) if p not in set(sum(frames, []))}
    shares = []
    for f, r in _pairs(8, 4):
        similarity = {p: _cosine(embeds[0, p], embeds[0, q]) for p, q in zip(frames[f], frames[r])}
        stays = [p for p in frames[f] if p in kept]
        gone = [p for p in frames[f] if p not in kept]
        shares.append(len(stays))
        if stays and gone:
            assert max(similarity[p] for p in stays) <= min(similarity[p] for p in gone) + 1e-5, (f, r)
    assert all(p in kept for p in frames[0] + frames[4])  # each window's first frame whole
    assert shares == [6, 6, 5, 5, 5, 5]  # 64 of 128 cells: 32 first, 32 over the six compared frames
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert answer.strip(), answer
