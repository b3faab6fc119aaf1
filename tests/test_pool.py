"""``pool``: average pooling of each image's / video frame's vision-token grid before the decoder — what it keeps and
the values it gives them against an independent naive reference, positions, counts, errors. Cached generation on that
choice == the shared naive reference, batch == alone, ``stride=1`` installing nothing, ``remove()``, FLOPs against
FlopCounterMode and the KV caches are the conformance suite's (tests/test_conformance.py).

The reference finds each vision token's grid cell on its own, not through :mod:`vtw.grids`: Qwen from the model's
own 3-D M-RoPE position ids (``(t, h, w)`` of every vision token), LLaVA-1.5 / Video-LLaVA from the square number of
tokens per image (a Video-LLaVA frame: its class token, then the square), the anyres families' images from
transformers' own ``get_anyres_image_grid_shape`` and ``unpad_image`` applied to a grid of coordinates, their video
frames from the pooled / resized square of each frame. It averages each window's
embeddings, puts the mean at the window's top-left token, and drops the other tokens of the window (and the newlines
of rows that do not start a window); the method's choice and values are read from the handle's stage record.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_flops import _token_counts, _workload
from test_withdraw import _lm_inputs, _rotary
from tiny_models import FAMILIES, VIDEO_FAMILIES, Sample, build_tiny_model, make_batch, make_singles

import vtw
from vtw import withdraw
from vtw.flops import SampleCounts, count_flops, kv_cache_bytes, paper_flops
from vtw.grids import SampleLayout, image_grids, input_layouts
from vtw.methods import Pool, make_method

NUM_LAYERS = 3
STEPS = 3
ATOL = 1e-4


def _model(family, attn="sdpa"):
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    model.generation_config.eos_token_id = None
    return model


def _runs(mask: torch.Tensor) -> list[torch.Tensor]:
    """The positions of each maximal run of True in a 1-D mask."""
    where = torch.nonzero(mask).flatten().tolist()
    runs, cur = [], []
    for p in where:
        if cur and p != cur[-1] + 1:
            runs.append(torch.tensor(cur))
            cur = []
        cur.append(p)
    return runs + ([torch.tensor(cur)] if cur else [])


def _cells(model, inputs: dict, pos: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Per image/video of the (single-sample) prompt: its positions, and ``{position: (frame, row, col)}`` of its grid
    cells (tokens not listed are kept as they are; ``"newline"`` maps row-newline positions to their row)."""
    cfg, family = model.config, vtw.get_family(model).model_type
    ids = inputs["input_ids"][0]
    out = []
    for token_id, kind in ((cfg.image_token_id, "image"), (getattr(cfg, "video_token_id", None), "video")):
        if token_id is None:
            continue
        for run in _runs(ids == token_id):
            cells, newlines = {}, {}
            if family.startswith("qwen"):  # the model's own (t, h, w) positions
                thw = pos[-3:, 0, run]  # (3, n)
                rel = thw - thw.min(1, keepdim=True).values
                for j, p in enumerate(run.tolist()):
                    cells[p] = tuple(int(v) for v in rel[:, j])
            elif kind == "video" and family == "video_llava":  # per frame: class token, then the square
                side = cfg.vision_config.image_size // cfg.vision_config.patch_size
                per = side * side + 1
                for j, p in enumerate(run.tolist()):
                    f, q = divmod(j, per)
                    if q:
                        cells[p] = (f, (q - 1) // side, (q - 1) % side)
            elif kind == "image" and family in ("llava", "video_llava"):
                side = math.isqrt(len(run))
                assert side * side == len(run)
                for j, p in enumerate(run.tolist()):
                    cells[p] = (0, j // side, j % side)
            elif kind == "video" and family in ("llava_next_video", "llava_onevision"):  # per frame: a square
                side = cfg.vision_config.image_size // cfg.vision_config.patch_size
                n = side // cfg.spatial_pool_stride if family == "llava_next_video" else -(-side // 2)
                frames = inputs["pixel_values_videos"].shape[1]
                assert len(run) == frames * n * n + (family == "llava_onevision")  # OneVision: one newline at the end
                for j, p in enumerate(run.tolist()[: frames * n * n]):
                    f, q = divmod(j, n * n)
                    cells[p] = (f, q // n, q % n)
            elif kind == "image" and family in ("llava_next", "llava_next_video", "llava_onevision"):
                import importlib

                module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
                get_anyres_image_grid_shape, unpad_image = module.get_anyres_image_grid_shape, module.unpad_image

                side = cfg.vision_config.image_size // cfg.vision_config.patch_size
                size = inputs["image_sizes"][0].tolist()
                gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                coords = torch.arange(gh * side * gw * side).view(1, gh * side, gw * side)
                kept = unpad_image(coords, torch.tensor(size))[0]  # (R, C) of the full grid's coordinates
                rows, cols = kept.shape
                base = run[: side * side].tolist()
                for j, p in enumerate(base):
                    cells[p] = (0, j // side, j % side)  # the base crop: frame 0
                rest = run[side * side :].tolist()
                assert len(rest) == rows * (cols + 1)
                for j, p in enumerate(rest):
                    r, c = divmod(j, cols + 1)
                    if c == cols:
                        newlines[p] = r
                    else:
                        cells[p] = (1, r, c)  # the unpadded grid: a second grid, "frame" 1
            else:
                raise AssertionError(f"no independent reference for {family} {kind}")
            out.append((run, cells, newlines))
    return out


def _pool_reference(model, inputs: dict, embeds: torch.Tensor, pos: torch.Tensor, window: tuple[int, int]):
    """``(pooled embeddings (1, n, D), kept input positions (n,))``, computed independently (module docstring)."""
    h = embeds[0].clone()
    keep = torch.ones(h.shape[0], dtype=torch.bool)
    sr, sc = window
    for _, cells, newlines in _cells(model, inputs, pos):
        windows: dict[tuple, list[int]] = {}
        for p, (f, r, c) in cells.items():
            windows.setdefault((f, r // sr, c // sc), []).append(p)
        for members in windows.values():
            corner = min(members)  # the window's top-left cell comes first in the sequence
            h[corner] = embeds[0, members].mean(0)
            keep[members] = False
            keep[corner] = True
        for p, r in newlines.items():
            keep[p] = r % sr == 0
    kept = torch.nonzero(keep).flatten()
    return h[kept][None], kept


@pytest.mark.parametrize("family", FAMILIES)
def test_each_window_keeps_and_averages_what_the_naive_pooling_does(family):
    """Every family, four windows (square, wide, tall, a partial edge): the stage keeps the reference's tokens, in
    order, and gives them the reference's values (the mean of each window at its top-left cell)."""
    model = _model(family)
    shape = (32, 64) if family != "llava" else (32, 32)
    sample = Sample(images=1, videos=int(family in VIDEO_FAMILIES), prefix=3, suffix=4, image_shape=shape)
    (inputs,) = make_singles(model, [sample])
    embeds, pos = _lm_inputs(model, inputs)
    for window in ((2, 2), (3, 3), (2, 1), (1, 3)):
        pooled, kept = _pool_reference(model, inputs, embeds, pos, window)
        with torch.no_grad(), withdraw(model, method="pool", stride=window[0], stride_cols=window[1]) as handle:
            handle.record_hidden = True
            model(**inputs)
        (record,) = handle.last_stages
        assert record.layer == 0 and kept.numel() < inputs["input_ids"].shape[1], window
        assert torch.equal(record.keep_index[0], kept), window
        torch.testing.assert_close(record.hidden, pooled, atol=1e-6, rtol=0, msg=str(window))


def test_pooled_tokens_keep_their_top_left_cells_positions():
    """Qwen2-VL: the pooled tokens of an image sit at the top-left cells of their windows, with those cells' own
    (t, h, w) M-RoPE rotary embeddings; the text keeps its own; nothing is renumbered."""
    model = _model("qwen2_vl")
    (inputs,) = make_singles(model, [Sample(images=1, prefix=2, suffix=3, image_shape=(32, 64))])
    lm = vtw.language_model(model)
    embeds, full_pos = _lm_inputs(model, inputs)
    full_cos, _, _ = _rotary(lm, embeds, full_pos)
    seen = {}
    with torch.no_grad(), withdraw(model, method="pool", stride=2) as handle:
        hook = lm.layers[1].register_forward_pre_hook(
            lambda m, a, kw: seen.update(cos=kw["position_embeddings"][0]), with_kwargs=True
        )
        model(**inputs)
        hook.remove()
    image = inputs["input_ids"][0] == model.config.image_token_id  # a 4 x 8 grid of merged patches
    thw = full_pos[-3:, 0][:, image]
    corner = ((thw[1] - thw[1].min()) % 2 == 0) & ((thw[2] - thw[2].min()) % 2 == 0)
    assert int(corner.sum()) == 8  # 2 x 4 windows
    kept = image.clone()
    kept[image] = corner
    kept |= ~image
    index = torch.nonzero(kept).flatten()
    assert handle.last_keep_index[0].tolist() == index.tolist()
    torch.testing.assert_close(seen["cos"], full_cos[..., index, :], atol=0, rtol=0)


def test_budget_windows_least_compute_first():
    cands = Pool().budget_candidates(4)
    shares = [1 / (c.window[0] * c.window[1]) for c in cands]
    assert shares == sorted(shares) and cands[-1].window == (1, 1) and cands[-2].window == (1, 2)
    assert [c.label for c in cands[-4:]] == ["pool 2x3", "pool 2x2", "pool 1x2", "pool 1x1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_counts_are_the_realized_ones(family):
    """What the FLOPs and KV models count for pool (from the sample's layout) is what each layer processed, and pooling
    lowers the paper's FLOPs."""
    model = _model(family)
    shape = (40, 24) if family.startswith("qwen") else (24, 40)
    sample = Sample(images=1, videos=int(family in VIDEO_FAMILIES), prefix=3, suffix=5, image_shape=shape)
    batch = make_batch(model, [sample])
    v, t = _token_counts(model, batch["input_ids"])
    (layout,) = input_layouts(model.config, batch["input_ids"], batch)
    method = Pool(stride=2)
    with torch.no_grad(), withdraw(model, method=method) as handle:
        model(**batch)
    pooled = sum(g.pooled(2).tokens for g in layout.grids)
    assert handle.last_layer_tokens[0].sum(-1).tolist() == [pooled + t] * NUM_LAYERS
    assert [list(p) for p in method.layer_tokens(NUM_LAYERS, v, t, layout)] == handle.last_layer_tokens[0].tolist()
    rep = count_flops(model.config, SampleCounts.of(_workload(model, batch), v, t, 3, vision_layout=layout), method)
    assert rep.prefill_decoder_tokens == (pooled + t,) * NUM_LAYERS and rep.prefill.reduction == 0
    kv = kv_cache_bytes(model.config, SampleCounts(vision_tokens=v, text_tokens=t, vision_layout=layout), method)
    assert kv.tokens_per_layer == (pooled + t,) * NUM_LAYERS
    assert paper_flops(model.config, SampleCounts(vision_tokens=v, text_tokens=t, vision_layout=layout), method) < \
        paper_flops(model.config, SampleCounts(vision_tokens=v, text_tokens=t))  # fmt: skip


def test_hand_derived_counts():
    """LLaVA-1.5-7B: 24 x 24 patches; 2x2 -> 144, 5x5 (partial edge windows) -> 5 x 5 = 25, 1x2 -> 288,
    2x3 -> 12 x 8 = 96. LLaVA-NeXT, a 640x480
    (WxH) photo: base 24x24 + unpadded 48 x 36 grid with 48 newlines = 2304 tokens; 2x2 -> 144 + 24 x (18 + 1)."""
    from vtw.flops import load_model_config

    cfg = load_model_config("llava-1.5-7b")
    for window, left in (((2, 2), 144), ((5, 5), 25), ((24, 24), 1), ((1, 1), 576), ((1, 2), 288), ((2, 3), 96)):
        rep = count_flops(cfg, SampleCounts(vision_tokens=576, text_tokens=10), Pool(*window))
        assert rep.prefill_decoder_tokens[0] == left + 10, window
    nxt = load_model_config("llava-next-7b")
    grids = image_grids(nxt, (480, 640))
    assert [(g.rows, g.cols, g.newline) for g in grids] == [(24, 24, 0), (36, 48, 1)]
    assert sum(g.tokens for g in grids) == 576 + 36 * 49
    layout = SampleLayout(images=grids)
    rep = count_flops(
        nxt,
        SampleCounts(vision_tokens=layout.tokens, text_tokens=10, vision_inputs=5, vision_layout=layout),
        Pool(stride=2),
    )
    assert rep.prefill_decoder_tokens[0] == 144 + 18 * 25 + 10


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="pool stride must be an integer >= 1, got 0"):
        make_method("pool", stride=0)
    with pytest.raises(ValueError, match="pool stride_cols must be an integer >= 1, got -1"):
        make_method("pool", stride=2, stride_cols=-1)
    with pytest.raises(ValueError, match="takes stride, stride_cols; got unknown keep"):
        make_method("pool", keep=0.5)
    from vtw.flops import load_model_config

    with pytest.raises(ValueError, match="each image's grid depends on its size"):
        count_flops(
            load_model_config("llava-next-7b"),
            SampleCounts(vision_tokens=2340, text_tokens=10, vision_inputs=5),
            Pool(stride=2),
        )


def test_images_encoded_outside_a_forward_do_not_set_the_grids():
    """LLaVA-NeXT: images of other sizes encoded by hand before a forward are not this prompt's; the forward's own
    ``image_sizes`` (a plain forward) or the encoding ``generate`` makes (a generation) set the grids."""
    model = _model("llava_next")
    (inputs,) = make_singles(model, [Sample(images=1, prefix=3, suffix=4, image_shape=(32, 64))])
    other = make_batch(model, [Sample(images=2, image_shape=(64, 32))], seed=5)
    with torch.no_grad(), withdraw(model, method="pool", stride=2):
        clean = model(**inputs).logits
        clean_gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        model.model.get_image_features(other["pixel_values"], image_sizes=other["image_sizes"])
        assert torch.equal(model(**inputs).logits, clean)
        model.model.get_image_features(other["pixel_values"], image_sizes=other["image_sizes"])
        assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), clean_gen)
