"""Registry of the multimodal model families VTW supports in the pinned transformers: every family fact lives here.

A :class:`FamilySpec` says where the parts of a model live (language decoder, vision tower, projector), which token
ids mark vision tokens, how the family lays images and videos out (what the FLOPs model and the lmms-eval model
need), which keys its processor outputs carry, and how to build a tiny config of it for tests. Lookups go by
``config.model_type``, so they work on a model instance or on a bare config (the FLOPs model uses configs only).
Adding a family is one entry in :data:`_FAMILIES` (plus its tiny config builder) and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as T
from torch import nn

#: How images reach the decoder. ``single``: one fixed-size encoder input per image (resized); ``anyres``: a base
#: crop plus the crops of the best ``image_grid_pinpoints`` grid, unpadded, one newline token per row;
#: ``anyres_max``: ``anyres`` plus LLaVA-OneVision's ``vision_aspect_ratio="anyres_max_N"`` downscale of large
#: grids, and no tiling when a sample has several images; ``grid``: the native-resolution patch grid of a Qwen ViT.
IMAGE_LAYOUTS = ("single", "anyres", "anyres_max", "grid")

#: How videos reach the decoder (``None``: the family takes no video). ``frames``: every frame through the tower,
#: every token kept, class token included (Video-LLaVA); ``pooled``: frame features spatially pooled by
#: ``spatial_pool_stride`` before the projector (LLaVA-NeXT-Video); ``resized``: frames projected, then bilinearly
#: resized to ``ceil(side / 2)`` squared, plus one newline token per video (LLaVA-OneVision); ``grid``: the 3-D
#: patch grid of a Qwen ViT (``video_grid_thw``).
VIDEO_LAYOUTS = ("frames", "pooled", "resized", "grid")

#: Vision encoders. ``fixed``: a CLIP or SigLIP tower at a fixed input size (which one: ``vision_config.model_type``);
#: ``qwen2_vl`` / ``qwen2_5_vl``: that family's ViT over a patch grid, with the patch merger as projector.
ENCODERS = ("fixed", "qwen2_vl", "qwen2_5_vl")

#: Sizes and token ids of the tiny test configs (:meth:`FamilySpec.tiny_config`): text ids are below ``TINY_IMAGE_ID``.
TINY_VOCAB = 160
TINY_IMAGE_ID = 150
TINY_VIDEO_ID = 151
TINY_PAD_ID = 0
TINY_HIDDEN = 32


@dataclass(frozen=True)
class FamilySpec:
    """One supported family.

    Attributes:
        model_type: ``config.model_type`` of the top-level model, e.g. ``"llava"``.
        display: human name used in messages, e.g. ``"LLaVA-1.5"``.
        model_class: the ``...ForConditionalGeneration`` class name in transformers.
        vision_token_attrs: config attributes holding the placeholder token ids of vision inputs (image, video).
        encoder: one of :data:`ENCODERS` (the FLOPs model's encoder kind).
        image_layout: one of :data:`IMAGE_LAYOUTS`.
        video: one of :data:`VIDEO_LAYOUTS`, or ``None`` when the family takes no video.
        vision_tower: attribute path, from the top-level model, of the (image) vision tower.
        video_tower: attribute path of a second tower that encodes the video frames (Video-LLaVA), else ``None``
            (the image tower encodes them).
        projector: attribute path of the projector (LLaVA's ``multi_modal_projector``, Qwen's patch merger).
        image_key: processor output key of the image pixels (``video_key`` is ``pixel_values_videos``).
        video_frames: frames per video the family's checkpoints were trained on, where fixed (Video-LLaVA's video
            tower: 8; transformers runs any number), else ``None``. The tiny test inputs use that many.
        mrope: whether the decoder uses Qwen2-VL's 3-D multimodal RoPE position ids (it then needs the token types,
            ``mm_token_type_ids``: 0 text, 1 image, 2 video).
        build_tiny: ``num_layers -> config`` of a tiny model of the family (see :meth:`tiny_config`).
    """

    model_type: str
    display: str
    model_class: str
    vision_token_attrs: tuple[str, ...]
    encoder: str
    image_layout: str
    video: str | None
    vision_tower: str
    projector: str
    build_tiny: Callable[[int], T.PretrainedConfig]
    image_key: str = "pixel_values"
    video_frames: int | None = None
    mrope: bool = False
    video_tower: str | None = None

    def __post_init__(self):
        for value, allowed, what in (
            (self.encoder, ENCODERS, "encoder"),
            (self.image_layout, IMAGE_LAYOUTS, "image_layout"),
            (self.video, (None, *VIDEO_LAYOUTS), "video"),
        ):
            if value not in allowed:
                raise ValueError(f"family {self.model_type}: {what}={value!r}; allowed: {allowed}")
        if (self.encoder == "fixed") == (self.image_layout == "grid"):
            raise ValueError(f"family {self.model_type}: the grid layout goes with a Qwen encoder, and only it")

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT-style tiling: the number of crops depends on the image size."""
        return self.image_layout in ("anyres", "anyres_max")

    @property
    def video_key(self) -> str | None:
        """Processor output key of the video pixels (``None``: no video)."""
        return "pixel_values_videos" if self.video is not None else None

    def vision_token_ids(self, config) -> tuple[int, ...]:
        """The placeholder token ids of this config's vision inputs (image and, where present, video)."""
        ids = []
        for attr in self.vision_token_attrs:
            value = getattr(config, attr, None)
            if value is None:  # older configs spell it ``*_token_index``
                value = getattr(config, attr.replace("_token_id", "_token_index"), None)
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"{self.display} config has none of {self.vision_token_attrs}: cannot find vision tokens")
        return tuple(ids)

    def tiny_config(self, num_layers: int = 4) -> T.PretrainedConfig:
        """A tiny config of this family for tests: a ``num_layers``-layer decoder (hidden :data:`TINY_HIDDEN`, 4
        heads, 2 KV heads, vocabulary :data:`TINY_VOCAB`), a 2-block vision encoder on 32 px images, image token
        :data:`TINY_IMAGE_ID` and video token :data:`TINY_VIDEO_ID`."""
        return self.build_tiny(num_layers)

    def module(self, model: nn.Module, which: str) -> nn.Module:
        """The ``"vision_tower"``, ``"video_tower"`` (the tower that encodes video frames) or ``"projector"``
        submodule of a model instance of this family."""
        path = {"vision_tower": self.vision_tower, "video_tower": self.video_tower or self.vision_tower,
                "projector": self.projector}[which]  # fmt: skip
        out = model
        for name in path.split("."):
            out = getattr(out, name)
        return out


# ------------------------------------------------------------------------------------------ tiny test configs
def _tiny_decoder(cls, num_layers: int, **kw):
    return cls(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=TINY_PAD_ID,
        tie_word_embeddings=False,
        **kw,
    )


def _tiny_clip() -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )


_TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
_TINY_LLAMA_VISION = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
_TINY_IDS = {"image_token_id": TINY_IMAGE_ID, "tie_word_embeddings": False}
_TINY_VIDEO_IDS = {**_TINY_IDS, "video_token_id": TINY_VIDEO_ID}


def _tiny_llava(num_layers: int) -> T.LlavaConfig:
    return T.LlavaConfig(
        text_config=_tiny_decoder(T.LlamaConfig, num_layers),
        vision_config=_tiny_clip(),
        **_TINY_LLAMA_VISION,
        **_TINY_IDS,
    )


def _tiny_llava_next(num_layers: int) -> T.LlavaNextConfig:
    return T.LlavaNextConfig(
        text_config=_tiny_decoder(T.LlamaConfig, num_layers),
        vision_config=_tiny_clip(),
        image_grid_pinpoints=_TINY_PINPOINTS,
        **_TINY_LLAMA_VISION,
        **_TINY_IDS,
    )


def _tiny_llava_onevision(num_layers: int) -> T.LlavaOnevisionConfig:
    vision = T.SiglipVisionConfig(
        hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    return T.LlavaOnevisionConfig(
        text_config=_tiny_decoder(T.Qwen2Config, num_layers),
        vision_config=vision,
        image_grid_pinpoints=_TINY_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        **_TINY_VIDEO_IDS,
    )


def _tiny_qwen(config_cls, text_cls, vision: T.PretrainedConfig, num_layers: int):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return config_cls(
        text_config=_tiny_decoder(text_cls, num_layers, rope_parameters=rope),
        vision_config=vision,
        vision_start_token_id=152,
        vision_end_token_id=153,
        **_TINY_VIDEO_IDS,
    )


def _tiny_qwen2_vl(num_layers: int) -> T.Qwen2VLConfig:
    vision = T.Qwen2VLVisionConfig(
        depth=2, embed_dim=16, hidden_size=TINY_HIDDEN, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2
    )
    return _tiny_qwen(T.Qwen2VLConfig, T.Qwen2VLTextConfig, vision, num_layers)


def _tiny_qwen2_5_vl(num_layers: int) -> T.Qwen2_5_VLConfig:
    vision = T.Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        out_hidden_size=TINY_HIDDEN,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    return _tiny_qwen(T.Qwen2_5_VLConfig, T.Qwen2_5_VLTextConfig, vision, num_layers)


def _tiny_video_llava(num_layers: int) -> T.VideoLlavaConfig:
    return T.VideoLlavaConfig(
        text_config=_tiny_decoder(T.LlamaConfig, num_layers),
        vision_config=_tiny_clip(),
        **_TINY_LLAMA_VISION,
        **_TINY_VIDEO_IDS,
    )


def _tiny_llava_next_video(num_layers: int) -> T.LlavaNextVideoConfig:
    return T.LlavaNextVideoConfig(
        text_config=_tiny_decoder(T.LlamaConfig, num_layers),
        vision_config=_tiny_clip(),
        image_grid_pinpoints=_TINY_PINPOINTS,
        spatial_pool_stride=2,
        **_TINY_LLAMA_VISION,
        **_TINY_VIDEO_IDS,
    )


# -------------------------------------------------------------------------------------------------- registry
_IMAGE = ("image_token_id",)
_IMAGE_VIDEO = ("image_token_id", "video_token_id")
_LLAVA_PARTS = {"vision_tower": "model.vision_tower", "projector": "model.multi_modal_projector"}
_QWEN_PARTS = {"vision_tower": "model.visual", "projector": "model.visual.merger", "mrope": True}

_FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec(
            "llava",
            "LLaVA-1.5",
            "LlavaForConditionalGeneration",
            _IMAGE,
            encoder="fixed",
            image_layout="single",
            video=None,
            build_tiny=_tiny_llava,
            **_LLAVA_PARTS,
        ),
        FamilySpec(
            "llava_next",
            "LLaVA-NeXT",
            "LlavaNextForConditionalGeneration",
            _IMAGE,
            encoder="fixed",
            image_layout="anyres",
            video=None,
            build_tiny=_tiny_llava_next,
            **_LLAVA_PARTS,
        ),
        FamilySpec(
            "llava_onevision",
            "LLaVA-OneVision",
            "LlavaOnevisionForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="fixed",
            image_layout="anyres_max",
            video="resized",
            build_tiny=_tiny_llava_onevision,
            **_LLAVA_PARTS,
        ),
        FamilySpec(
            "qwen2_vl",
            "Qwen2-VL",
            "Qwen2VLForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="qwen2_vl",
            image_layout="grid",
            video="grid",
            build_tiny=_tiny_qwen2_vl,
            **_QWEN_PARTS,
        ),
        FamilySpec(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            "Qwen2_5_VLForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="qwen2_5_vl",
            image_layout="grid",
            video="grid",
            build_tiny=_tiny_qwen2_5_vl,
            **_QWEN_PARTS,
        ),
        FamilySpec(
            "video_llava",
            "Video-LLaVA",
            "VideoLlavaForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="fixed",
            image_layout="single",
            video="frames",
            vision_tower="model.image_tower",
            video_tower="model.video_tower",  # a second tower of the same class
            projector="model.multi_modal_projector",
            build_tiny=_tiny_video_llava,
            image_key="pixel_values_images",
            video_frames=8,
        ),
        FamilySpec(
            "llava_next_video",
            "LLaVA-NeXT-Video",
            "LlavaNextVideoForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="fixed",
            image_layout="anyres",
            video="pooled",
            build_tiny=_tiny_llava_next_video,
            **_LLAVA_PARTS,
        ),
    )
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _config_of(model_or_config):
    return model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config


def supported_families_text() -> str:
    return ", ".join(f"{s.display} ({s.model_class}, model_type={s.model_type!r})" for s in _FAMILIES.values())


def get_family(model_or_config) -> FamilySpec:
    """The :class:`FamilySpec` of a model or config; ``ValueError`` listing the supported families otherwise."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = _FAMILIES.get(model_type)
    if spec is None:
        name = type(model_or_config).__name__
        raise ValueError(
            f"{name} (model_type={model_type!r}) is not supported by vtw. Supported: {supported_families_text()}"
        )
    return spec


def text_config(model_or_config):
    """The language decoder's config (``config.text_config``)."""
    config = _config_of(model_or_config)
    get_family(config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config.text_config


def num_decoder_layers(model_or_config) -> int:
    """``L``: the number of layers of the language decoder."""
    return int(text_config(model_or_config).num_hidden_layers)


def language_model(model: nn.Module) -> nn.Module:
    """The language decoder module (its ``.layers`` are the decoder layers) of a supported model instance."""
    get_family(model)
    inner = getattr(model, "model", model)  # ...ForConditionalGeneration.model, or the bare ...Model
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise ValueError(f"{type(model).__name__}: no language_model with decoder layers found")
    return lm


def vision_token_mask(model_or_config, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of the vision (image and video placeholder) tokens.

    Args:
        input_ids: ``(B, T)`` token ids.

    Returns:
        ``(B, T)`` bool tensor, True at vision tokens.
    """
    config = _config_of(model_or_config)
    ids = torch.tensor(get_family(config).vision_token_ids(config), device=input_ids.device)
    return torch.isin(input_ids, ids)


def family_specs() -> tuple[FamilySpec, ...]:
    """Every supported family, in registry order."""
    return tuple(_FAMILIES.values())


def family(model_type: str) -> FamilySpec:
    """The :class:`FamilySpec` of a ``model_type`` name; ``ValueError`` listing the supported ones otherwise."""
    spec = _FAMILIES.get(model_type)
    if spec is None:
        raise ValueError(f"unknown family {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    return spec
