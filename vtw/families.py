"""Registry of the multimodal model families VTW supports in the pinned transformers.

A family says where the language decoder of a model lives and which token ids mark vision tokens. Lookups go by
``config.model_type``, so they work on a model instance or on a bare config (the FLOPs model uses configs only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """One supported family.

    Attributes:
        model_type: ``config.model_type`` of the top-level model, e.g. ``"llava"``.
        display: human name used in messages, e.g. ``"LLaVA-1.5"``.
        model_class: the ``...ForConditionalGeneration`` class name in transformers.
        vision_token_attrs: config attributes holding the placeholder token ids of vision inputs (image, video).
        mrope: whether the decoder uses Qwen2-VL's 3-D multimodal RoPE position ids.
    """

    model_type: str
    display: str
    model_class: str
    vision_token_attrs: tuple[str, ...]
    mrope: bool = False

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


_FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("llava", "LLaVA-1.5", "LlavaForConditionalGeneration", ("image_token_id",)),
        FamilySpec("llava_next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration", ("image_token_id",)),
        FamilySpec(
            "llava_onevision",
            "LLaVA-OneVision",
            "LlavaOnevisionForConditionalGeneration",
            ("image_token_id", "video_token_id"),
        ),
        FamilySpec(
            "qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", ("image_token_id", "video_token_id"), mrope=True
        ),
        FamilySpec(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            "Qwen2_5_VLForConditionalGeneration",
            ("image_token_id", "video_token_id"),
            mrope=True,
        ),
        FamilySpec(
            "video_llava", "Video-LLaVA", "VideoLlavaForConditionalGeneration", ("image_token_id", "video_token_id")
        ),
        FamilySpec(
            "llava_next_video",
            "LLaVA-NeXT-Video",
            "LlavaNextVideoForConditionalGeneration",
            ("image_token_id", "video_token_id"),
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
