"""Untrained tiny video models with their processors, built from the tiny configs of :mod:`vtw.synthvideo.configs`,
for runs of the video path on a CPU, and the one builder of the tiny video processors.

``python -m vtw.synthvideo.tiny --output DIR`` writes (seeded: identical bytes) a `VideoLlavaForConditionalGeneration`
of ``vtw.synthvideo.configs.tiny_config("video_llava", 4)`` (CLIP towers on 32 px frames, 8 px patches: 16 tokens per
image, 17 per frame, 136 per 8-frame clip; a 4-layer Llama decoder of width 32), randomly initialised, so its answers
are at chance (0.25 on `vtw_synthvideo`). The shipped `vtw/assets/tiny-video-llava/` (`ASSET_DIR`) is the *trained* model
of ``python -m vtw_train synthvideo`` (64 px frames, 16 px patches, same token counts), so ``--output`` has no
default here.

:func:`build_processor` is the one place that builds the processors of the tiny LLaVA-style video families (the
tests' tiny checkpoints use it too).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers as T

from vtw.families import family
from vtw.synthvideo.configs import TINY_IMAGE_ID, TINY_VIDEO_ID, TINY_VOCAB, tiny_config
from vtw.synthvideo.generator import vocabulary
from vtw.synthvqa.generator import vocabulary as image_vocabulary
from vtw.synthvqa.model import CHAT_TEMPLATE, CHAT_WORDS, SPECIAL_TOKENS, word_level_tokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-video-llava"
IMAGE_SIZE = 32
PATCH = 8
NUM_LAYERS = 4
IMAGE, VIDEO = "<image>", "<video>"

_IMAGE_PART = "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
#: the embedded default's chat template (``vtw.synthvqa.model``) with ``{"type": "video"}`` parts as ``<video>``
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    _IMAGE_PART, _IMAGE_PART + "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
)
VIDEO_FAMILIES: tuple[str, ...] = ("video_llava", "llava_next_video", "llava_onevision")


def build_tokenizer() -> T.PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny config's vocabulary (:data:`vtw.synthvideo.configs.TINY_VOCAB` ids): the
    specials, chat words and every word of both synthetic benchmarks, fillers, then `<image>` / `<video>` at the
    config's ids."""
    words = list(SPECIAL_TOKENS[:4])
    for w in (*CHAT_WORDS, *vocabulary(), *image_vocabulary()):
        if w not in words:
            words.append(w)
    if len(words) > TINY_IMAGE_ID:
        raise ValueError(f"{len(words)} words do not fit below the image token id {TINY_IMAGE_ID}")
    words += [f"<filler{i}>" for i in range(len(words), TINY_IMAGE_ID)] + [IMAGE, VIDEO]  # 150, 151 = TINY_VIDEO_ID
    words += [f"<filler{i}>" for i in range(len(words), TINY_VOCAB)]
    return word_level_tokenizer(words, add_bos=False, additional_special_tokens=[IMAGE, VIDEO],
                                chat_template=VIDEO_CHAT_TEMPLATE)  # fmt: skip


def build_processor(family_name: str, tokenizer, chat_template: str, *, size: int = IMAGE_SIZE, patch: int = PATCH):
    """The processor of a tiny ``family_name`` checkpoint (one of :data:`VIDEO_FAMILIES`; towers on ``size`` px with
    ``patch`` px patches, as :func:`vtw.synthvideo.configs.tiny_config`): images and frames resized (and
    centre-cropped) to ``size``.

    Raises:
        ValueError: another family.
    """
    square = {"size": {"height": size, "width": size}}
    clip = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    common = {"tokenizer": tokenizer, "chat_template": chat_template, "image_token": IMAGE, "video_token": VIDEO}
    if family_name == "video_llava":
        return T.VideoLlavaProcessor(
            image_processor=T.VideoLlavaImageProcessor(**clip),
            video_processor=T.VideoLlavaVideoProcessor(**clip),
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            **common,
        )
    pinpoints = tiny_config(family_name, 1).image_grid_pinpoints
    if family_name == "llava_next_video":
        return T.LlavaNextVideoProcessor(
            image_processor=T.LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **clip),
            video_processor=T.LlavaNextVideoVideoProcessor(**clip),
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            **common,
        )
    if family_name == "llava_onevision":
        return T.LlavaOnevisionProcessor(
            image_processor=T.LlavaOnevisionImageProcessor(image_grid_pinpoints=pinpoints, **square),
            video_processor=T.LlavaOnevisionVideoProcessor(**square),
            num_image_tokens=(size // patch) ** 2,
            vision_feature_select_strategy="full",
            **common,
        )
    raise ValueError(f"no tiny processor for family {family_name!r}; allowed: {VIDEO_FAMILIES}")


def prompt_text(processor, item) -> str:
    """The chat prompt of a `vtw.synthvideo.generator.ClipItem` as the `vtw` lmms-eval model writes it
    (`InputBuilder.prompt`: the video, then the text; generation prompt appended)."""
    content = [{"type": "video"}, {"type": "text", "text": item.prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip


def build_checkpoint(out: str | Path, family_name: str = "video_llava", *, seed: int = 0) -> Path:
    """Save a seeded, randomly initialised tiny ``family_name`` model (float32) and its processor to ``out``."""
    tok = build_tokenizer()
    processor = build_processor(family_name, tok, VIDEO_CHAT_TEMPLATE)
    config = tiny_config(family_name, NUM_LAYERS)
    for cfg in (config, config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = getattr(T, family(family_name).model_class)(config).eval()
    model.generation_config = T.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        suppress_tokens=[TINY_IMAGE_ID, TINY_VIDEO_ID, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id],
    )  # fmt: skip
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vtw.synthvideo.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--family", default="video_llava", choices=VIDEO_FAMILIES)
    args = parser.parse_args(argv)
    path = build_checkpoint(args.output, args.family)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
