"""Tiny configs of every supported family for tests: the video families' from :mod:`vtw.synthvideo.configs` (the
embedded checkpoints are built from them), the others' here, with the same sizes and ids."""

from __future__ import annotations

from functools import partial

import transformers as T

from vtw.synthvideo.configs import (
    TINY_HIDDEN,
    TINY_PINPOINTS,
    TINY_VIDEO_CONFIGS,
    TINY_VIDEO_IDS,
    tiny_decoder,
    tiny_llava_like,
)


def _tiny_qwen(config_cls, text_cls, vision: T.PretrainedConfig, num_layers: int):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return config_cls(
        text_config=tiny_decoder(text_cls, num_layers, rope_parameters=rope),
        vision_config=vision,
        vision_start_token_id=152,
        vision_end_token_id=153,
        **TINY_VIDEO_IDS,
    )


def _tiny_qwen2_vl(num_layers: int) -> T.Qwen2VLConfig:
    vision = T.Qwen2VLVisionConfig(
        depth=2, embed_dim=16, hidden_size=TINY_HIDDEN, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2
    )
    return _tiny_qwen(T.Qwen2VLConfig, T.Qwen2VLTextConfig, vision, num_layers)


def _tiny_qwen2_5_vl(num_layers: int) -> T.Qwen2_5_VLConfig:
    vision = T.Qwen2_5_VLVisionConfig(
        depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=TINY_HIDDEN, num_heads=2, patch_size=4,
        spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1],
    )  # fmt: skip
    return _tiny_qwen(T.Qwen2_5_VLConfig, T.Qwen2_5_VLTextConfig, vision, num_layers)


_TINY_CONFIGS = {
    "llava": partial(tiny_llava_like, T.LlavaConfig, video=False),
    "llava_next": partial(tiny_llava_like, T.LlavaNextConfig, video=False, image_grid_pinpoints=TINY_PINPOINTS),
    "qwen2_vl": _tiny_qwen2_vl,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
    **TINY_VIDEO_CONFIGS,
}


def tiny_config(family_name: str, num_layers: int = 4) -> T.PretrainedConfig:
    """A tiny config of ``family_name`` with a ``num_layers``-layer language decoder (see
    :mod:`vtw.synthvideo.configs` for the sizes and ids)."""
    return _TINY_CONFIGS[family_name](num_layers)
