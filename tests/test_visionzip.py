"""VisionZip: what it keeps and the values it merges against an independent naive reference, images encoded outside a
forward, when it installs nothing, SDPA towers, exact scoring FLOPs and counts, clear errors.

The reference takes the class token's attention from the eager vision tower's own ``output_attentions`` (the
feature layer's weights, mean over heads) and the keys from that layer's ``k_proj`` on its input
(``hidden_states``), and picks and merges in plain Python; the method under test (eager or SDPA, same weights) is
read from the handle's stage record. Cached generation on that choice == the shared naive reference, batch == alone,
bit-identity where nothing is installed, ``remove()``, FLOPs against FlopCounterMode and the KV caches are the
conformance suite's (tests/test_conformance.py).

Towers without a class token (LLaVA-OneVision's SigLIP, the Qwen ViTs: the received-attention variant): the reference
recomputes the attention each patch receives in the tower's last layer in plain loops (Qwen: per segment, head and
query, from what the last block received, window order and all, each decoder token found by its merger output) or
takes it from the eager SigLIP tower's own weights, maps tokens to patches through the model's own packing and
pooling (LLaVA-OneVision), and picks and merges as above.
"""

from __future__ import annotations

import pytest
import torch
from reference import counting
from test_withdraw import _lm_inputs, _vision
from tiny_models import IMAGE_ID, VIDEO_FAMILIES, VIDEO_ID, Sample, build_tiny_model, make_batch, make_singles
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtw
from vtw import withdraw
from vtw.grids import input_layouts
from vtw.methods import VisionZip

NUM_LAYERS = 4
STEPS = 3
ATOL = 1e-4
CELLS = 16  # the tiny CLIP: 32 px images, 8 px patches


def _model(family, attn="sdpa"):
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    model.generation_config.eos_token_id = None
    return model


def _towers(model):
    """``(kind, tower, pixel key, placeholder id, class tokens per frame in the sequence)`` of the tiny families."""
    if vtw.get_family(model).model_type == "video_llava":
        return [("image", model.model.image_tower, "pixel_values_images", IMAGE_ID, 0),
                ("video", model.model.video_tower, "pixel_values_videos", VIDEO_ID, 1)]  # fmt: skip
    return [("image", vtw.get_family(model).module(model, "vision_tower"), "pixel_values", IMAGE_ID, 0)]


def _scores(model, tower, pixels):
    """Per tower input: the class token's attention to each patch ``(N, n)`` and the patches' keys ``(N, n, hd)``
    in the layer whose output the projector reads (``hidden_states[vision_feature_layer]``)."""
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    layers = tower.encoder.layers
    index = len(layers) + model.config.vision_feature_layer  # hidden_states[i + 1] is the output of layer i
    assert torch.equal(out.hidden_states[index + 1], out.hidden_states[model.config.vision_feature_layer])
    layer = layers[index]
    attention = out.attentions[index][:, :, 0, 1:].mean(1)
    k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))
    keys = k.view(*k.shape[:2], layer.self_attn.num_heads, -1).mean(2)[:, 1:]
    return attention, keys


def _groups(attention, keys, dominant, contextual):
    """``{kept patch: [patches averaged into it]}`` for one image or frame, in plain Python."""
    n = len(attention)
    if n <= dominant + contextual:
        return {i: [i] for i in range(n)}
    ranked = sorted(range(n), key=lambda i: -float(attention[i]))
    groups = {i: [i] for i in ranked[:dominant]}
    rest = [i for i in range(n) if i not in groups]
    if contextual:
        targets = rest[:: max(1, len(rest) // contextual)][:contextual]
        for t in targets:
            groups[t] = [t]
        for i in rest:
            if i not in targets:
                sims = [float(torch.nn.functional.cosine_similarity(keys[i], keys[t], dim=0)) for t in targets]
                groups[targets[sims.index(max(sims))]].append(i)
    return groups


def _next_crops(model, inputs):
    """LLaVA-NeXT: ``(tower inputs (N, C, H, W), [(tower input, patch) per image token, (-1, -1) at newlines])``,
    from the model's own ``pack_image_features`` applied to features that carry each crop's and patch's index."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    crops = [image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
             for size in inputs["image_sizes"]]  # fmt: skip
    pixels = torch.cat([p[:k] for p, k in zip(inputs["pixel_values"], crops)])
    start = torch.tensor([0, *crops]).cumsum(0)
    index = [torch.stack(torch.meshgrid(torch.arange(a, a + k), torch.arange(side * side), indexing="ij"), -1).float()
             for a, k in zip(start.tolist(), crops)]  # fmt: skip
    packed, _ = model.model.pack_image_features(index, inputs["image_sizes"], "default", torch.tensor([-1.0, -1.0]))
    return pixels, torch.cat(packed).long().tolist()


def _tower_units(model, inputs):
    """``[(tower, tower inputs, [(tower input, sequence positions of its patches, their patch indices)])]`` and the
    positions of row newlines, for one sample."""
    ids = inputs["input_ids"][0]
    out, newlines = [], []
    for _, tower, key, token_id, lead in _towers(model):
        if key not in inputs:
            continue
        where = torch.nonzero(ids == token_id).flatten()
        if "image_sizes" in inputs:  # LLaVA-NeXT: per crop, through its own packing
            pixels, packed = _next_crops(model, inputs)
            rows = {}
            for position, (row, patch) in zip(where.tolist(), packed):
                if row < 0:
                    newlines.append(position)
                else:
                    rows.setdefault(row, ([], []))
                    rows[row][0].append(position)
                    rows[row][1].append(patch)
            units = [(row, torch.tensor(cells), torch.tensor(patches)) for row, (cells, patches) in rows.items()]
        else:
            pixels = inputs[key].flatten(0, 1) if inputs[key].dim() == 5 else inputs[key]
            where = where.view(len(pixels), lead + CELLS)[:, lead:]
            units = [(row, cells, torch.arange(CELLS)) for row, cells in enumerate(where)]
        out.append((tower, pixels, units))
    return out, newlines


def _zip_reference(model, inputs, dominant, contextual):
    """``(values (1, n, D), kept (n,))``: the decoder inputs of one sample's kept tokens after VisionZip, and their
    input columns, computed in plain Python (module docstring)."""
    embeds, _ = _lm_inputs(model, inputs)
    embeds = embeds.clone()
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    towers, newlines = _tower_units(model, inputs)
    for tower, pixels, units in towers:
        attention, keys = _scores(model, tower, pixels)
        for row, cells, patches in units:
            keep[cells] = False
            for kept, members in _groups(attention[row, patches], keys[row, patches], dominant, contextual).items():
                embeds[0, cells[kept]] = embeds[0, cells[members]].mean(0)
                keep[cells[kept]] = True
    if any(len(cells) > dominant + contextual for _, cells, _ in towers[0][2][1:]):  # a crop of the grid reduced
        keep[newlines] = False  # (the tiny samples here have one image each)
    index = torch.nonzero(keep).flatten()
    return embeds[:, index], index


def _generate(model, inputs, method, stale=False):
    """Greedy generation under ``method`` with the KV cache; ``stale``: first encode other images outside a forward
    (what the tower saw then is not this prompt's)."""
    with torch.no_grad(), withdraw(model, method=method) as handle:
        if stale:
            other = make_batch(model, [Sample(images=3)], seed=7)
            sizes = {k: other[k] for k in ("image_sizes", "image_grid_thw") if k in other}
            model.model.get_image_features(other[_towers(model)[0][2]], **sizes)
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1), handle


SETTINGS = [(4, 3), (0, 5), (6, 0), (2, 7), (54, 10)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("family", "sample"),
    [
        ("llava", Sample(images=2, prefix=3, suffix=4)),
        ("video_llava", Sample(images=1, videos=1, prefix=2)),
        ("llava_next", Sample(images=1, image_shape=(32, 32))),  # 2 crops: 8 patches of each survive unpadding
        ("llava_next", Sample(images=1, image_shape=(40, 64))),  # 2 x 2 crops of 12 patches each (rows unpadded)
    ],
)
def test_each_image_keeps_and_merges_what_the_naive_zip_does(family, sample, attn):
    """The stage keeps the reference's tokens, in order, with the reference's values (dominant patches as they are,
    contextual targets averaged with the patches that joined them), under eager and SDPA towers and decoders."""
    reference_model = _model(family, "eager")  # same seed: the same weights as the model under test
    model = reference_model if attn == "eager" else _model(family, attn)
    (inputs,) = make_singles(model, [sample])
    for dominant, contextual in SETTINGS[:3] if sample.videos else SETTINGS:
        with torch.no_grad():
            values, kept = _zip_reference(reference_model, inputs, dominant, contextual)
            with withdraw(model, method=VisionZip(dominant, contextual)) as handle:
                handle.record_hidden = True
                model(**inputs)
        if kept.numel() == inputs["input_ids"].shape[1]:  # every tower input keeps all its patches
            assert not handle.active and (dominant, contextual) == (54, 10)
            continue
        (record,) = handle.last_stages
        assert torch.equal(record.keep_index[0], kept), (dominant, contextual)
        torch.testing.assert_close(record.hidden, values, atol=1e-5, rtol=0, msg=str((dominant, contextual)))


@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next", "llava_onevision", "qwen2_5_vl"])
def test_images_encoded_outside_a_forward_do_not_change_the_choice(family):
    """Other images encoded by hand before ``generate`` (the tower saw them, they are not this prompt's): a batch with
    different image (and crop) counts generates exactly what it generates without them."""
    model = _model(family)
    samples = [Sample(images=2, prefix=3, suffix=6), Sample(prefix=9, suffix=4), Sample(images=1, prefix=1, suffix=2)]
    if family == "llava_next":  # different crop counts
        samples += [Sample(images=1, image_shape=(64, 40)), Sample(images=2, image_shape=(32, 64))]
    if family in ("video_llava", "llava_onevision", "qwen2_5_vl"):  # images and videos through one tower or two
        samples += [Sample(videos=1, prefix=2, suffix=3), Sample(images=1, videos=1, prefix=1, suffix=1)]
    if family == "qwen2_5_vl":  # images of different sizes: different patch counts
        samples += [Sample(images=1, image_shape=(40, 24)), Sample(images=2, image_shape=(24, 48))]
    batch = make_batch(model, samples)
    method = VisionZip(5, 2)
    tokens, logits, handle = _generate(model, batch, method, stale=True)
    clean_tokens, clean_logits, _ = _generate(model, batch, method)
    assert torch.equal(tokens, clean_tokens) and torch.equal(logits, clean_logits)
    assert handle.last_layer_tokens[0, 0, 0] < _vision(model, batch["input_ids"])[0].sum()  # something was zipped


def _feature_layers(model):
    return [tower.encoder.layers[len(tower.encoder.layers) + model.config.vision_feature_layer]
            for _, tower, *_ in _towers(model)]  # fmt: skip


def test_tower_inputs_with_at_most_dominant_plus_contextual_patches_install_nothing():
    """Video-LLaVA's 16-patch images and frames: ``dominant + contextual >= 16`` changes nothing, so nothing is
    installed (no hook on either tower's feature layer, no wrapper); one token fewer is a reduction."""
    model = _model("video_llava")
    for dominant, contextual, active in ((CELLS, 0, False), (54, 10, False), (3, CELLS - 3, False),
                                         (CELLS - 1, 0, True), (3, CELLS - 4, True)):  # fmt: skip
        with withdraw(model, method="visionzip", dominant=dominant, contextual=contextual) as handle:
            assert handle.active is active, (dominant, contextual)
            assert all(bool(layer._forward_pre_hooks) is active for layer in _feature_layers(model))
            assert ("get_image_features" in model.model.__dict__) is active
    assert not any(layer._forward_pre_hooks for layer in _feature_layers(model))


def test_the_vision_towers_keep_sdpa():
    model = _model("video_llava")
    batch = make_batch(model, [Sample(images=1, videos=1)])
    weights = []
    hooks = [m.register_forward_hook(lambda m, a, out: weights.append(out[1]))
             for _, tower, *_ in _towers(model) for m in tower.modules() if type(m).__name__ == "CLIPAttention"]  # fmt: skip
    with torch.no_grad(), withdraw(model, method="visionzip", dominant=4, contextual=3):
        model(**batch)
        assert {tower.config._attn_implementation for _, tower, *_ in _towers(model)} == {"sdpa"}
    for h in hooks:
        h.remove()
    assert len(weights) == 4 and all(w is None for w in weights)  # SDPA returns no weights; eager would


COUNTED: list = []
_Counted = counting(VisionZip, COUNTED, with_inputs=True)


@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next"])
def test_scoring_flops_equal_flop_counter(family):
    model = _model(family)
    samples = [Sample(images=2), Sample(prefix=5)]
    if family == "video_llava":
        samples += [Sample(images=1, videos=1)]
    if family == "llava_next":
        samples += [Sample(images=1, image_shape=(64, 40))]
    batch = make_batch(model, samples)
    v = vtw.vision_token_mask(model, batch["input_ids"]).sum(1).tolist()
    t = batch["attention_mask"].sum(1) - torch.tensor(v)
    for dominant, contextual in ((4, 3), (6, 0), (0, 9), (9, 2), (CELLS, 0)):
        COUNTED.clear()
        method = _Counted(dominant, contextual)
        with torch.no_grad(), withdraw(model, method=method):
            cache = model(**batch, use_cache=True).past_key_values
        layouts = input_layouts(model.config, batch["input_ids"], batch)
        expected = sum(method.scoring_flops(model.config, layout) for layout in layouts)
        if dominant + contextual >= CELLS:  # nothing to reduce: nothing installed, nothing spent
            assert not COUNTED and expected == 0
            continue
        ((counted, inputs),) = COUNTED
        assert input_layouts(model.config, batch["input_ids"], inputs) == layouts
        assert counted == expected > 0
        # the decoder's caches hold what the FLOPs model counts: the longest sample's tokens
        counts = [method.layer_tokens(NUM_LAYERS, v[b], int(t[b]), layouts[b])[0] for b in range(len(samples))]
        assert cache.layers[0].keys.shape[-2] == max(a + b for a, b in counts)


def test_budget_candidates_follow_the_papers_split_least_compute_first():
    cands = VisionZip().budget_candidates(NUM_LAYERS)
    totals = [c.dominant + c.contextual for c in cands]
    assert totals == sorted(totals) and totals[0] == 1 and totals[-1] == 576
    for paper in (VisionZip(54, 10), VisionZip(108, 20), VisionZip(162, 30)):
        assert paper in cands
    assert VisionZip().label == "visionzip 54+10" and VisionZip.free_parameter in VisionZip().params()


@pytest.mark.parametrize(
    ("family", "kwargs", "needle"),
    [
        ("llava", dict(dominant=-1), "visionzip dominant must be an integer >= 0, got -1"),
        ("llava", dict(contextual=2.5), "visionzip contextual must be an integer >= 0, got 2.5"),
        ("llava", dict(dominant=True), "visionzip dominant must be an integer >= 0, got True"),
        ("llava", dict(dominant=0, contextual=0), "got 0 + 0: at least one is needed"),
        ("llava", dict(keep=0.5), "takes contextual, dominant; got unknown keep"),
        ("qwen2_5_vl", dict(window_last=True), "and block 1 attends within windows (fullatt_block_indexes=[0])"),
    ],
)
def test_bad_parameters_and_a_window_last_block_fail_before_any_forward(family, kwargs, needle):
    model = _model(family)
    if kwargs.pop("window_last", False):  # a Qwen2.5-VL whose last block attends within windows
        model.config.vision_config.fullatt_block_indexes = [0]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as info:
        withdraw(model, method="visionzip", **kwargs)
    assert needle in str(info.value), str(info.value)
    assert not calls and not model.model.__dict__.get("get_image_features")


def test_llava_next_video_takes_images_and_refuses_its_pooled_video_frames():
    model = _model("llava_next_video")
    (image,) = make_singles(model, [Sample(images=1, image_shape=(64, 40))])
    (video,) = make_singles(model, [Sample(videos=1)])
    with torch.no_grad(), withdraw(model, method="visionzip", dominant=4, contextual=3):
        assert model(**image).logits.shape[1] == image["input_ids"].shape[1] - (16 - 7) - 4 * (12 - 7) - 8
        with pytest.raises(ValueError, match="LLaVA-NeXT-Video: its video frames are pooled before the projector"):
            model(**video)


@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_declared_counts_and_scoring_are_the_realized_ones(family):
    """What ``count_flops`` counts for one sample from its layout: each layer's tokens == what the run's layers
    processed, and the scoring FLOPs are the method's own (FlopCounterMode over the whole run is the conformance
    suite's, on the realized counts)."""
    from test_flops import _token_counts, _workload

    from vtw.flops import SampleCounts, count_flops

    model = _model(family)
    shape = {"llava_next": (40, 64), "llava_onevision": (24, 40), "qwen2_vl": (40, 24), "qwen2_5_vl": (40, 24)}
    sample = Sample(images=1, videos=int(family in VIDEO_FAMILIES and family != "llava_next_video"), prefix=3,
                    suffix=5, image_shape=shape.get(family, (32, 32)))  # fmt: skip
    batch = make_batch(model, [sample])
    v, t = _token_counts(model, batch["input_ids"])
    (layout,) = input_layouts(model.config, batch["input_ids"], batch)
    method = VisionZip(4, 3)
    with torch.no_grad(), withdraw(model, method=method) as handle:
        model(**batch)
    rep = count_flops(model.config, SampleCounts.of(_workload(model, batch), v, t, 3, vision_layout=layout), method)
    assert rep.prefill.reduction == method.scoring_flops(model.config, layout) > 0
    assert list(rep.prefill_decoder_tokens) == handle.last_layer_tokens[0].sum(-1).tolist()
    assert rep.prefill_decoder_tokens[0] == sum(method.grid_tokens(g) for g in layout.grids) + t < v + t


# ------------------------------------------------------------------------------------------ towers without a class token
# LLaVA-OneVision's SigLIP and the Qwen ViTs: each token scored by the attention its patches *receive* in the tower's
# last layer (mean over heads and the queries of its tower input), recomputed here from what that layer received.
RECEIVED_SETTINGS = [(4, 3), (0, 5), (6, 0), (2, 1), (1, 0), (54, 10)]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _qwen_received_by_hand(block, x, cos, sin, bounds):
    """``(received (S,), keys (S, hd))`` of the block's input ``x`` ``(S, D)`` in plain loops: per attention segment
    ``bounds`` (cu_seqlens), per head, per query, the softmax over the segment's keys, averaged over heads and the
    segment's queries; keys rotated as the attention rotates them, mean over heads."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[1]
    head_dim = width // heads
    normed = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = (normed @ weight[:width].T + bias[:width]).view(len(x), heads, head_dim)
    k = (normed @ weight[width : 2 * width].T + bias[width : 2 * width]).view(len(x), heads, head_dim)
    q, k = (t * cos[:, None] + _rotate_half(t) * sin[:, None] for t in (q, k))
    received = torch.zeros(len(x))
    for a, b in zip(bounds, bounds[1:]):
        for h in range(heads):
            for i in range(a, b):
                p = torch.softmax(k[a:b, h] @ q[i, h] * head_dim**-0.5, dim=0)
                received[a:b] += p / (heads * (b - a))
    return received, k.mean(1)


def _qwen_call(tower, pixels, grid):
    """``(what the last block received: x and its keyword arguments; the merger's output, merged)`` and the tower's
    output features (the decoder's tokens, in order) of one tower call."""
    seen = {}
    hooks = [tower.blocks[-1].register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], **kw), with_kwargs=True),
             tower.merger.register_forward_hook(lambda m, a, o: seen.update(merged=o))]  # fmt: skip
    try:
        return seen, tower(pixels, grid_thw=grid).pooler_output
    finally:
        for h in hooks:
            h.remove()


def _qwen_units(model, inputs):
    """One sample's ``[(cells (n,) sequence positions, scores (n,), keys (n, hd), in a crop grid: False)]``, one per
    attention segment (an image, a video's temporal slice) of each tower call. A decoder token is the merger's output
    row that equals its feature (exact match: Qwen2.5-VL's blocks run in window order), i.e. ``m²`` consecutive rows
    of the last block's input; its score and key: the mean of theirs."""
    tower = model.model.visual
    ids, out = inputs["input_ids"][0], []
    for key, grid, token in (("pixel_values", "image_grid_thw", IMAGE_ID),
                             ("pixel_values_videos", "video_grid_thw", VIDEO_ID)):  # fmt: skip
        if key not in inputs:
            continue
        seen, features = _qwen_call(tower, inputs[key], inputs[grid])
        bounds = seen["cu_seqlens"].tolist()
        received, keys = _qwen_received_by_hand(tower.blocks[-1], seen["x"], *seen["position_embeddings"], bounds)
        rows = []  # the block-input merged token of each decoder token
        for f in features:
            (match,) = torch.nonzero((seen["merged"] == f).all(1)).flatten().tolist()
            rows.append(match)
        group = len(seen["x"]) // len(features)  # m² patches per token
        cells = torch.nonzero(ids == token).flatten()
        for a, b in zip(bounds, bounds[1:]):
            tokens = [j for j, u in enumerate(rows) if a <= u * group < b]
            patches = [list(range(rows[j] * group, (rows[j] + 1) * group)) for j in tokens]
            scores = torch.stack([received[p].mean() for p in patches])
            out.append((cells[tokens], scores, torch.stack([keys[p].mean(0) for p in patches]), False))
    return out


def _siglip_scores(model, pixels):
    """The eager SigLIP tower's own attention weights in the layer whose output the projector reads, mean over heads
    and queries ``(N, S)``, and that layer's keys (``k_proj`` of its normed input, mean over heads) ``(N, S, hd)``."""
    tower = model.model.vision_tower
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    layers = tower.encoder.layers
    index = len(layers) + model.config.vision_feature_layer
    layer = layers[index]
    k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))
    return out.attentions[index].mean(1).mean(1), k.view(*k.shape[:2], layer.self_attn.num_heads, -1).mean(2)


def _onevision_units(model, inputs):
    """One sample's units as :func:`_qwen_units`: every crop of each image through the model's own
    ``pack_image_features`` (features carrying each crop's and patch's index; a downscaled grid mixes them: its cells
    stay whole, no unit), every video frame through its own ``apply_pooling`` (features carrying each patch's score
    and key: a token's are the bilinear resize of its patches'). The last flag: a unit of a crop grid. Returns
    ``(units, the positions of the crop grids' row newlines)``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches as crops_of

    config, ids, out, newlines = model.config, inputs["input_ids"][0], [], []
    side = config.vision_config.image_size // config.vision_config.patch_size
    if "pixel_values" in inputs:
        single = "batch_num_images" not in inputs or int(inputs["batch_num_images"][0]) == 1
        crops = [crops_of(s.tolist(), config.image_grid_pinpoints, config.vision_config.image_size) if single else 1
                 for s in inputs["image_sizes"]]  # fmt: skip
        scores, keys = _siglip_scores(model, torch.cat([p[:k] for p, k in zip(inputs["pixel_values"], crops)]))
        start = torch.tensor([0, *crops]).cumsum(0).tolist()
        index = [torch.stack(torch.meshgrid(torch.arange(a, a + k), torch.arange(side * side), indexing="ij"), -1).float()
                 for a, k in zip(start, crops)]  # fmt: skip
        packed, _ = model.model.pack_image_features(index, inputs["image_sizes"], torch.tensor([-1.0, -1.0]),
                                                    config.vision_aspect_ratio)  # fmt: skip
        groups, rows = {}, torch.cat([p for p, k in zip(packed, crops) if k > 1] or [torch.zeros(0, 2)])
        newlines = [i for i, (c, _) in zip(torch.nonzero(ids == IMAGE_ID).flatten().tolist(), rows.tolist()) if c < 0]
        for position, (crop, patch) in zip(
            torch.nonzero(ids == IMAGE_ID).flatten().tolist(), torch.cat(packed).tolist()
        ):
            if crop >= 0 and crop == int(crop) and patch == int(patch):  # a crop's patch (not a newline, not resized)
                groups.setdefault(int(crop), ([], []))
                groups[int(crop)][0].append(position)
                groups[int(crop)][1].append(int(patch))
        for crop, (cells, patches) in groups.items():
            out.append((torch.tensor(cells), scores[crop, patches], keys[crop, patches], crop not in start))
    if "pixel_values_videos" in inputs:
        scores, keys = _siglip_scores(model, inputs["pixel_values_videos"][0])
        cells = model.model.apply_pooling(torch.cat([scores[..., None], keys], -1))  # (frames, r², 1 + hd)
        where = torch.nonzero(ids == VIDEO_ID).flatten()[:-1]  # the last one is the video's newline
        for f, frame in enumerate(cells):
            out.append((where[f * len(frame) : (f + 1) * len(frame)], frame[:, 0], frame[:, 1:], False))
    return out, newlines


def _received_reference(model, inputs, dominant, contextual):
    """``(values (1, n, D), kept (n,))`` as :func:`_zip_reference`, the received-attention variant: the units of
    :func:`_qwen_units` / :func:`_onevision_units`, picked and merged by :func:`_groups`; a crop grid with a unit
    reduced loses its row newlines."""
    embeds, _ = _lm_inputs(model, inputs)
    embeds = embeds.clone()
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    qwen = vtw.get_family(model).model_type.startswith("qwen")
    units, newlines = (_qwen_units(model, inputs), []) if qwen else _onevision_units(model, inputs)
    for cells, scores, keys, _ in units:
        keep[cells] = False
        for kept, members in _groups(scores, keys, dominant, contextual).items():
            embeds[0, cells[kept]] = embeds[0, cells[members]].mean(0)
            keep[cells[kept]] = True
    if any(grid and len(cells) > dominant + contextual for cells, _, _, grid in units):
        keep[newlines] = False  # (the samples here have one image each)
    index = torch.nonzero(keep).flatten()
    return embeds[:, index], index


def _qwen_video(model, slices: int, seed: int = 3) -> dict:
    """A Qwen prompt of one 32 x 32 px video of ``slices`` temporal slices (``2 · slices`` frames), built by hand."""
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    side = 32 // vc.patch_size
    tokens = slices * (side // vc.spatial_merge_size) ** 2
    ids = torch.tensor([[5, 6, 7] + [VIDEO_ID] * tokens + [8, 9]])
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": 2 * (ids == VIDEO_ID).int(),
            "pixel_values_videos": torch.rand(slices * side * side, patch, generator=g) * 2 - 1,
            "video_grid_thw": torch.tensor([[slices, side, side]])}  # fmt: skip


def _onevision_images(model, count: int = 2) -> dict:
    """A LLaVA-OneVision prompt of ``count`` images in one sample (``batch_num_images``): the model encodes each as
    one crop, ``side²`` tokens and a newline."""
    (inputs,) = make_singles(model, [Sample(images=count, image_shape=(24, 40))])
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ids = [5, 6, 7] + sum(([IMAGE_ID] * (side * side + 1) + [8] for _ in range(count)), []) + [9, 10]
    ids = torch.tensor([ids])
    return {
        **inputs,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "batch_num_images": torch.tensor([count]),
    }


def _received_prompts(family):
    """``(model setup, prompt)`` pairs: an image and a video (a 2-slice Qwen video); LLaVA-OneVision also several
    images in one sample, and an image whose crop grid it downscales (``anyres_max_1``), then a video."""
    if family.startswith("qwen"):
        return [(None, Sample(images=1, videos=1, image_shape=(40, 24))), (None, "video2")]
    return [(None, Sample(images=1, videos=1, image_shape=(24, 40))), (None, "images2"),
            ("anyres_max_1", Sample(images=1, videos=1, image_shape=(24, 40)))]  # fmt: skip


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_towers_without_a_class_token_keep_and_merge_what_the_naive_received_zip_does(family, attn):
    """The received-attention variant keeps the reference's tokens, in order, with the reference's values, under
    eager and SDPA towers and decoders; Qwen2.5-VL's window order undone; LLaVA-OneVision's crops, images of a
    multi-image sample and video frames (resized) each a unit, its downscaled crop grid whole."""
    reference_model = _model(family, "eager")
    model = reference_model if attn == "eager" else _model(family, attn)
    for setup, sample in _received_prompts(family):
        for m in {reference_model, model}:
            m.config.vision_aspect_ratio = setup or "anyres_max_9"
        if sample == "video2":
            inputs = _qwen_video(model, 2)
        elif sample == "images2":
            inputs = _onevision_images(model)
        else:
            (inputs,) = make_singles(model, [sample])
        for dominant, contextual in RECEIVED_SETTINGS:
            with torch.no_grad():
                values, kept = _received_reference(reference_model, inputs, dominant, contextual)
                with withdraw(model, method=VisionZip(dominant, contextual)) as handle:
                    handle.record_hidden = True
                    model(**inputs)
            what = (setup, sample, dominant, contextual)
            if kept.numel() == inputs["input_ids"].shape[1]:  # every unit keeps all its tokens
                assert (dominant, contextual) == (54, 10), what
                if not handle.active:
                    continue
            (record,) = handle.last_stages
            assert torch.equal(record.keep_index[0], kept), what
            torch.testing.assert_close(record.hidden, values, atol=1e-5, rtol=0, msg=str(what))
    for m in {reference_model, model}:
        m.config.vision_aspect_ratio = "anyres_max_9"


def test_the_downscaled_onevision_grid_stays_whole_and_the_rest_is_reduced():
    """``anyres_max_1``: the 2 crops of a 24 x 40 image, 4 x 6 patches once unpadded, are downscaled to 3 x 4 cells;
    those cells and their newlines stay, the base crop and the video frames after it (read past the grid's 2 encoded crops) are reduced."""
    model = _model("llava_onevision")
    model.config.vision_aspect_ratio = "anyres_max_1"
    (inputs,) = make_singles(model, [Sample(images=1, videos=1, image_shape=(24, 40))])
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == IMAGE_ID).flatten()
    assert len(image) == 16 + 3 * (4 + 1)  # base crop, then 3 rows of 4 cells and a newline
    with torch.no_grad(), withdraw(model, method=VisionZip(2, 1)) as handle:
        model(**inputs)
    kept = set(handle.last_stages[0].keep_index[0].tolist())
    assert set(image[16:].tolist()) <= kept and len(set(image[:16].tolist()) & kept) == 3
    video = torch.nonzero(ids == VIDEO_ID).flatten()
    assert len(set(video.tolist()) & kept) == 2 * 3 + 1  # 2 frames of 2 x 2 cells keep 3; the newline stays
    layouts = input_layouts(model.config, inputs["input_ids"], inputs)
    assert VisionZip(2, 1).layer_tokens(NUM_LAYERS, len(image) + len(video), 8, layouts[0])[0][0] == len(
        [c for c in kept if ids[c] in (IMAGE_ID, VIDEO_ID)]
    )


def test_received_attention_in_query_blocks_equals_the_whole_softmax(monkeypatch):
    """The ``S x S`` probabilities computed a few query rows at a time add up to the mean of the whole softmax."""
    from vtw.methods import visionzip

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 10, 4, generator=g), torch.randn(3, 10, 4, generator=g)
    whole = torch.softmax(q @ k.transpose(1, 2) * 0.5, dim=-1).mean((0, 1))
    torch.testing.assert_close(visionzip.received_attention(q, k, 0.5), whole)
    for chunk in (30, 31, 60, 1):  # 3 heads x 10 keys: 1, 1, 2 and 1 query rows per block
        monkeypatch.setattr(visionzip, "CHUNK", chunk)
        torch.testing.assert_close(visionzip.received_attention(q, k, 0.5), whole)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_received_scoring_flops_equal_flop_counter(family):
    """The received variant's own FLOPs (``q kᵀ`` over every patch pair of each tower input reduced, the query and
    key projections, the cosines) against FlopCounterMode, a batch of several images and videos."""
    model = _model(family)
    if family.startswith("qwen"):
        samples = [Sample(images=2, image_shape=(40, 24)), Sample(prefix=5), Sample(images=1, videos=1)]
    else:
        samples = [Sample(images=1, videos=1), Sample(prefix=5), Sample(images=1, image_shape=(64, 40))]
    batch = make_batch(model, samples)
    v = vtw.vision_token_mask(model, batch["input_ids"]).sum(1).tolist()
    t = batch["attention_mask"].sum(1) - torch.tensor(v)
    layouts = input_layouts(model.config, batch["input_ids"], batch)
    for dominant, contextual in ((4, 3), (6, 0), (0, 9), (2, 1), (CELLS, 0)):
        COUNTED.clear()
        method = _Counted(dominant, contextual)
        with torch.no_grad(), withdraw(model, method=method):
            cache = model(**batch, use_cache=True).past_key_values
        expected = sum(method.scoring_flops(model.config, layout) for layout in layouts)
        counted = [flops for flops, _ in COUNTED]
        assert counted == ([] if family == "llava_onevision" and dominant + contextual >= CELLS else [expected])
        assert (expected > 0) == (dominant + contextual < CELLS)
        counts = [method.layer_tokens(NUM_LAYERS, v[b], int(t[b]), layouts[b])[0] for b in range(len(samples))]
        assert cache.layers[0].keys.shape[-2] == max(a + b for a, b in counts)
