"""Registry of the multimodal model families VTW supports in the pinned transformers: every family fact lives here.

A :class:`FamilySpec` says where the parts of a model live (language decoder, vision tower, projector), which token
ids mark vision tokens, how the family lays images and videos out (its :class:`vtw.layouts.Layout`, which answers
what the FLOPs model, the grids and the lmms-eval model ask), and which keys its processor outputs carry. Lookups go
by ``config.model_type``, so they work on a model instance or on a bare config (the FLOPs model uses configs only).
Adding a family is one entry in :data:`_FAMILIES` (plus its tiny test config in ``tests/tiny_configs.py``) and its
test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .layouts import Anyres, AnyresMax, FramesVideo, Layout, PooledVideo, QwenGrid, ResizedVideo

#: Vision encoders. ``fixed``: a CLIP or SigLIP tower at a fixed input size (which one: ``vision_config.model_type``);
#: ``qwen2_vl`` / ``qwen2_5_vl``: that family's ViT over a patch grid, with the patch merger as projector.
ENCODERS = ("fixed", "qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class FamilySpec:
    """One supported family.

    Attributes:
        model_type: ``config.model_type`` of the top-level model, e.g. ``"llava"``.
        display: human name used in messages, e.g. ``"LLaVA-1.5"``.
        model_class: the ``...ForConditionalGeneration`` class name in transformers.
        vision_token_attrs: config attributes holding the placeholder token ids of vision inputs (image, video).
        encoder: one of :data:`ENCODERS` (the FLOPs model's encoder kind).
        layout: how the family lays images out, its ``video`` how it lays videos out (:mod:`vtw.layouts`).
        vision_tower: attribute path, from the top-level model, of the (image) vision tower.
        video_tower: attribute path of a second tower that encodes the video frames (Video-LLaVA), else ``None``
            (the image tower encodes them).
        projector: attribute path of the projector (LLaVA's ``multi_modal_projector``, Qwen's patch merger).
        image_key: processor output key of the image pixels (``video_key`` is ``pixel_values_videos``).
        video_frames: frames per video the family's checkpoints were trained on, where fixed (Video-LLaVA's video
            tower: 8; transformers runs any number), else ``None``. The tiny test inputs use that many.
        mrope: whether the decoder uses Qwen2-VL's 3-D multimodal RoPE position ids (it then needs the token types,
            ``mm_token_type_ids``: 0 text, 1 image, 2 video).
    """

    model_type: str
    display: str
    model_class: str
    vision_token_attrs: tuple[str, ...]
    encoder: str
    vision_tower: str
    projector: str
    layout: Layout = Layout()
    image_key: str = "pixel_values"
    video_frames: int | None = None
    mrope: bool = False
    video_tower: str | None = None

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"family {self.model_type}: encoder={self.encoder!r}; allowed: {ENCODERS}")
        if not isinstance(self.layout, Layout):
            raise ValueError(f"family {self.model_type}: layout={self.layout!r} is no vtw.layouts.Layout")
        if (self.encoder == "fixed") == self.layout.native_grid:
            raise ValueError(f"family {self.model_type}: the grid layout goes with a Qwen encoder, and only it")
        video = replace(self.layout.video, family=self.display)  # the layout names its family in messages
        object.__setattr__(self, "layout", replace(self.layout, family=self.display, video=video))

    @property
    def image_layout(self) -> str:
        """The name of the image layout: ``single``, ``anyres``, ``anyres_max`` or ``grid``."""
        return self.layout.name

    @property
    def video(self) -> str | None:
        """The name of the video layout (``frames``, ``pooled``, ``resized``, ``grid``), ``None``: no video."""
        return self.layout.video.name

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT-style tiling: the number of crops depends on the image size."""
        return self.layout.tiled

    @property
    def takes_video(self) -> bool:
        return self.layout.video.takes_video

    @property
    def video_key(self) -> str | None:
        """Processor output key of the video pixels (``None``: no video)."""
        return "pixel_values_videos" if self.takes_video else None

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

    def module(self, model: nn.Module, which: str) -> nn.Module:
        """The ``"vision_tower"``, ``"video_tower"`` (the tower that encodes video frames) or ``"projector"``
        submodule of a model instance of this family."""
        path = {"vision_tower": self.vision_tower, "video_tower": self.video_tower or self.vision_tower,
                "projector": self.projector}[which]  # fmt: skip
        out = model
        for name in path.split("."):
            out = getattr(out, name)
        return out


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
            layout=Layout(),
            **_LLAVA_PARTS,
        ),
        FamilySpec(
            "llava_next",
            "LLaVA-NeXT",
            "LlavaNextForConditionalGeneration",
            _IMAGE,
            encoder="fixed",
            layout=Anyres(),
            **_LLAVA_PARTS,
        ),
        FamilySpec(
            "llava_onevision",
            "LLaVA-OneVision",
            "LlavaOnevisionForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="fixed",
            layout=AnyresMax(ResizedVideo()),
            **_LLAVA_PARTS,
        ),
        FamilySpec(
            "qwen2_vl",
            "Qwen2-VL",
            "Qwen2VLForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="qwen2_vl",
            layout=QwenGrid(),
            **_QWEN_PARTS,
        ),
        FamilySpec(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            "Qwen2_5_VLForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="qwen2_5_vl",
            layout=QwenGrid(),
            **_QWEN_PARTS,
        ),
        FamilySpec(
            "video_llava",
            "Video-LLaVA",
            "VideoLlavaForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="fixed",
            layout=Layout(FramesVideo()),
            vision_tower="model.image_tower",
            video_tower="model.video_tower",  # a second tower of the same class
            projector="model.multi_modal_projector",
            image_key="pixel_values_images",
            video_frames=8,
        ),
        FamilySpec(
            "llava_next_video",
            "LLaVA-NeXT-Video",
            "LlavaNextVideoForConditionalGeneration",
            _IMAGE_VIDEO,
            encoder="fixed",
            layout=Anyres(PooledVideo()),
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
