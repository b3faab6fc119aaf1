"""VisionZip: what it keeps and the values it merges against an independent naive reference, images encoded outside a
forward, when it installs nothing, SDPA towers, exact scoring FLOPs and counts, clear errors.

The reference takes the class token's attention from the eager vision tower's own ``output_attentions`` (the
feature layer's weights, mean over heads) and the keys from that layer's ``k_proj`` on its input
(``hidden_states``), and picks and merges in plain Python; the method under test (eager or SDPA, same weights) is
read from the handle's stage record. Cached generation on that choice == the shared naive reference, batch == alone,
bit-identity where nothing is installed, ``remove()``, FLOPs against FlopCounterMode and the KV caches are the
conformance suite's (tests/test_conformance.py).
"""

from __future__ import annotations

import pytest
import torch
from reference import counting
from test_withdraw import _lm_inputs, _vision
from tiny_models import IMAGE_ID, VIDEO_ID, Sample, build_tiny_model, make_batch, make_singles
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
    return [("image", model.model.vision_tower, "pixel_values", IMAGE_ID, 0)]


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
            sizes = {"image_sizes": other["image_sizes"]} if "image_sizes" in other else {}
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


@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next"])
def test_images_encoded_outside_a_forward_do_not_change_the_choice(family):
    """Other images encoded by hand before ``generate`` (the tower saw them, they are not this prompt's): a batch with
    different image (and crop) counts generates exactly what it generates without them."""
    model = _model(family)
    samples = [Sample(images=2, prefix=3, suffix=6), Sample(prefix=9, suffix=4), Sample(images=1, prefix=1, suffix=2)]
    if family == "llava_next":  # different crop counts
        samples += [Sample(images=1, image_shape=(64, 40)), Sample(images=2, image_shape=(32, 64))]
    if family == "video_llava":
        samples += [Sample(videos=1, prefix=2, suffix=3), Sample(images=1, videos=1, prefix=1, suffix=1)]
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
        ("llava_onevision", {}, "LLaVA-OneVision's tower (siglip_vision_model) has no class token"),
        ("qwen2_vl", {}, "Qwen2-VL's tower (qwen2_vl_vision) has no class token"),
        ("qwen2_5_vl", {}, "Qwen2.5-VL's tower (qwen2_5_vl_vision) has no class token"),
    ],
)
def test_bad_parameters_and_towers_without_a_class_token_fail_before_any_forward(family, kwargs, needle):
    model = _model(family)
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


@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next"])
def test_declared_counts_and_scoring_are_the_realized_ones(family):
    """What ``count_flops`` counts for one sample from its layout: each layer's tokens == what the run's layers
    processed, and the scoring FLOPs are the method's own (FlopCounterMode over the whole run is the conformance
    suite's, on the realized counts)."""
    from test_flops import _encoder_kwargs, _token_counts

    from vtw.flops import count_flops

    model = _model(family)
    sample = Sample(images=1, videos=int(family == "video_llava"), prefix=3, suffix=5,
                    image_shape=(40, 64) if family == "llava_next" else (32, 32))  # fmt: skip
    batch = make_batch(model, [sample])
    v, t = _token_counts(model, batch["input_ids"])
    (layout,) = input_layouts(model.config, batch["input_ids"], batch)
    method = VisionZip(4, 3)
    with torch.no_grad(), withdraw(model, method=method) as handle:
        model(**batch)
    rep = count_flops(model.config, vision_tokens=v, text_tokens=t, generated_tokens=3, method=method,
                      vision_layout=layout, **_encoder_kwargs(model, batch))  # fmt: skip
    assert rep.prefill.reduction == method.scoring_flops(model.config, layout) > 0
    assert list(rep.prefill_decoder_tokens) == handle.last_layer_tokens[0].sum(-1).tolist()
    assert rep.prefill_decoder_tokens[0] == sum(method.grid_tokens(g) for g in layout.grids) + t < v + t
