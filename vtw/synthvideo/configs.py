"""Tiny configs of the LLaVA-style video families: what :mod:`vtw.synthvideo.tiny` builds its untrained checkpoints
from and the tests build their tiny models from (the other families' tiny configs are in ``tests/tiny_configs.py``).

Every tiny config has a ``num_layers``-layer decoder (hidden :data:`TINY_HIDDEN`, 4 heads, 2 KV heads, vocabulary
:data:`TINY_VOCAB`), a 2-block vision encoder on 32 px images, image token :data:`TINY_IMAGE_ID` and video token
:data:`TINY_VIDEO_ID`; text ids are below ``TINY_IMAGE_ID``.
"""

from __future__ import annotations

from functools import partial

import transformers as T

TINY_VOCAB = 160
TINY_IMAGE_ID = 150
TINY_VIDEO_ID = 151
TINY_PAD_ID = 0
TINY_HIDDEN = 32


#: the tiny decoder's sizes (``num_hidden_layers`` is each config's own)
TINY_DECODER = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": TINY_HIDDEN,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": TINY_PAD_ID,
    "tie_word_embeddings": False,
}
#: the tiny vision towers' sizes: 2 blocks on 32 px images, 8 px patches (16 patches per image)
TINY_TOWER = {
    "hidden_size": 24,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
TINY_LLAMA_VISION = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
TINY_IDS = {"image_token_id": TINY_IMAGE_ID, "tie_word_embeddings": False}
TINY_VIDEO_IDS = {**TINY_IDS, "video_token_id": TINY_VIDEO_ID}


def tiny_decoder(cls, num_layers: int, **kw):
    """A ``num_layers``-layer tiny decoder config of class ``cls`` (:data:`TINY_DECODER`, ``kw`` on top)."""
    return cls(**TINY_DECODER, num_hidden_layers=num_layers, **kw)


def tiny_clip() -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(**TINY_TOWER, projection_dim=24)


def tiny_llava_like(config_cls, num_layers: int, *, video: bool = True, text_cls=T.LlamaConfig, vision=None, **extra):
    """A tiny LLaVA-style config: a Llama decoder (``text_cls``), a CLIP tower (``vision``), LLaVA-1.5's feature
    selection and the tiny ids (``video``: the video id too), ``extra`` on top."""
    ids = TINY_VIDEO_IDS if video else TINY_IDS
    return config_cls(
        text_config=tiny_decoder(text_cls, num_layers),
        vision_config=vision or tiny_clip(),
        **{**TINY_LLAMA_VISION, **ids, **extra},
    )


def _tiny_llava_onevision(num_layers: int) -> T.LlavaOnevisionConfig:
    return tiny_llava_like(
        T.LlavaOnevisionConfig,
        num_layers,
        text_cls=T.Qwen2Config,
        vision=T.SiglipVisionConfig(**TINY_TOWER),
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


#: model_type -> ``num_layers -> config`` of the tiny video families
TINY_VIDEO_CONFIGS = {
    "video_llava": partial(tiny_llava_like, T.VideoLlavaConfig),
    "llava_next_video": partial(
        tiny_llava_like, T.LlavaNextVideoConfig, image_grid_pinpoints=TINY_PINPOINTS, spatial_pool_stride=2
    ),
    "llava_onevision": _tiny_llava_onevision,
}


def tiny_config(family_name: str, num_layers: int = 4) -> T.PretrainedConfig:
    """The tiny config of one of the video families (:data:`TINY_VIDEO_CONFIGS`)."""
    if family_name not in TINY_VIDEO_CONFIGS:
        raise ValueError(f"no tiny config for {family_name!r} here; allowed: {tuple(TINY_VIDEO_CONFIGS)}")
    return TINY_VIDEO_CONFIGS[family_name](num_layers)
