"""vtw.families: every registry fact checked against the pinned transformers' own classes (signatures, config
attributes, module tree, which submodules run), and bad lookups."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers as T
from tiny_configs import tiny_config
from tiny_models import Sample, build_tiny_model, make_batch

from vtw.families import SUPPORTED_FAMILIES, FamilySpec, family, family_specs, get_family, num_decoder_layers
from vtw.layouts import QwenGrid


@pytest.mark.parametrize("name", SUPPORTED_FAMILIES)
def test_registry_facts_match_transformers(name):
    spec = family(name)
    cls = getattr(T, spec.model_class)
    config = tiny_config(name, 3)
    assert cls.config_class.model_type == spec.model_type == config.model_type
    assert get_family(config) is spec and num_decoder_layers(config) == 3
    assert all(getattr(config, attr, None) is not None for attr in spec.vision_token_attrs)
    forward = inspect.signature(cls.forward).parameters
    assert spec.image_key in forward
    assert ("pixel_values_videos" in forward) == spec.takes_video
    defaults = type(config)()  # the family's config class with its own defaults
    assert spec.anyres == hasattr(defaults, "image_grid_pinpoints")
    assert (spec.image_layout == "anyres_max") == hasattr(defaults, "vision_aspect_ratio")
    assert (spec.video == "pooled") == hasattr(defaults, "spatial_pool_stride")
    vision_type = config.vision_config.model_type
    if spec.encoder == "fixed":
        assert vision_type in ("clip_vision_model", "siglip_vision_model")
    else:
        assert spec.image_layout == spec.video == "grid" and vision_type.startswith(spec.encoder)
    model = cls(config).eval()
    assert spec.mrope == hasattr(model.model, "get_rope_index")


@pytest.mark.parametrize("name", SUPPORTED_FAMILIES)
def test_pixel_key_and_layout_match_the_familys_image_processor(name):
    """What the family's own image processor (transformers' auto mapping, default settings) returns for an image:
    the image key the lmms-eval model and the FLOPs meter read, ``image_sizes`` for anyres tiling, the patch grid
    for the grid layout."""
    from PIL import Image
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    spec = family(name)
    classes = IMAGE_PROCESSOR_MAPPING_NAMES[name]
    processor = getattr(T, classes.get("pil") or classes["torchvision"])()
    keys = set(processor(images=[Image.new("RGB", (40, 30))], return_tensors="pt").keys())
    assert spec.image_key in keys
    assert ("image_sizes" in keys) == spec.anyres
    assert ("image_grid_thw" in keys) == (spec.image_layout == "grid")


@pytest.mark.parametrize("name", SUPPORTED_FAMILIES)
def test_video_key_is_the_pixel_key_of_the_familys_video_processor(name):
    """What the family's own video processor (transformers' auto mapping, default settings) returns for a clip: its
    one pixel key is the video key the FLOPs meter reads; a family without a video processor has no video key."""
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    spec = family(name)
    classes = VIDEO_PROCESSOR_MAPPING_NAMES.get(name)
    assert (classes is None) == (not spec.takes_video)
    if classes is None:
        assert spec.video_key is None
        return
    processor = getattr(T, classes.get("pil") or classes["torchvision"])()
    clip = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    keys = set(processor(videos=[clip], return_tensors="pt").keys())
    assert {k for k in keys if k.startswith("pixel_values")} == {spec.video_key}


@pytest.mark.parametrize("name", SUPPORTED_FAMILIES)
def test_tower_and_projector_paths_are_the_modules_that_run_on_an_image(name):
    """The registry's vision tower and projector are two submodules that run when the model sees an image and do
    not run on a text-only sample (the FLOPs test attributes the counter's figures to them)."""
    model = build_tiny_model(name, num_layers=1)
    spec = get_family(model)
    parts = {part: spec.module(model, part) for part in ("vision_tower", "projector")}
    assert parts["vision_tower"] is not parts["projector"]
    called = []
    hooks = [m.register_forward_hook(lambda *a, part=part: called.append(part)) for part, m in parts.items()]
    try:
        with torch.no_grad():
            model(**make_batch(model, [Sample(prefix=2, suffix=2)]))
            assert called == []
            model(**make_batch(model, [Sample(images=1, prefix=2, suffix=2)]))
    finally:
        for h in hooks:
            h.remove()
    assert set(called) == {"vision_tower", "projector"}


def test_bad_lookups_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="unknown family 'gpt'.*llava.*qwen2_5_vl"):
        family("gpt")
    with pytest.raises(ValueError, match="model_type='bert'.*not supported.*LLaVA-1.5"):
        get_family(T.BertConfig())
    spec = family_specs()[0]
    with pytest.raises(ValueError, match="encoder='vit'; allowed"):
        FamilySpec(**{**spec.__dict__, "encoder": "vit"})
    with pytest.raises(ValueError, match="layout='grid' is no vtw.layouts.Layout"):
        FamilySpec(**{**spec.__dict__, "layout": "grid"})
    with pytest.raises(ValueError, match="grid layout goes with a Qwen encoder"):
        FamilySpec(**{**spec.__dict__, "layout": QwenGrid()})
