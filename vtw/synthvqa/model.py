"""The tiny LLaVA of the embedded default: config, word-level tokenizer, image processor, processor, chat template.

Architecture (a real `LlavaForConditionalGeneration`, LLaVA-1.5 layout at toy width):

- vision tower: `CLIPVisionModel`, 192 x 192 images, 16 px patches -> 1 CLS + 144 patch tokens, `VISION_LAYERS`
  layers of width `VISION_WIDTH`; `vision_feature_select_strategy="default"` drops the CLS token, so every image
  becomes `NUM_IMAGE_TOKENS = 144` vision tokens (`LlavaProcessor` expands `<image>` to exactly that many).
- projector: 2-layer MLP with GELU (`LlavaMultiModalProjector`).
- language model: `LlamaForCausalLM` with `TEXT_LAYERS` layers of width `TEXT_WIDTH`.
- tokenizer: a `PreTrainedTokenizerFast` over a `tokenizers` WordLevel model whose vocabulary is every word the
  generator (`vtw.synthvqa.generator`) and the chat template can write; `<image>` is a special token.
- chat template (LLaVA-1.5 style, no system prompt): `USER: <image>\\n{question} ASSISTANT: {answer}</s>`.
  It accepts a message content either as a string (lmms-eval's `llava_hf` passes `"<image>\\n..."`) or as a list of
  `{"type": "image"}` / `{"type": "text", "text": ...}` parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtw.synthvqa.generator import IMAGE_SIZE, vocabulary

PATCH_SIZE = 16
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
NUM_IMAGE_TOKENS = NUM_PATCHES  # "default" strategy: CLS dropped

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
CHAT_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
    "{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny LLaVA. `text_layers` is L, the number of decoder layers VTW withdraws from."""

    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 4
    text_ffn: int = 384
    vision_ffn: int = 288

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyLlavaSpec.{name} must be a positive int, got {value!r}")
        if self.text_layers < 8:
            raise ValueError(f"TinyLlavaSpec.text_layers must be >= 8, got {self.text_layers}")
        if self.text_width % self.text_heads or self.vision_width % self.vision_heads:
            raise ValueError(f"widths must divide by head counts, got {self}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials `<pad> <s> </s> <unk> <image>` (ids 0-4), then chat words, then generator words.

    Encoding splits on whitespace and isolates every punctuation character; `<s>` is prepended.
    """
    words = list(SPECIAL_TOKENS)
    for word in (*CHAT_WORDS, *vocabulary()):
        if word not in words:
            words.append(word)
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, words.index(BOS))]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build_image_processor() -> CLIPImageProcessor:
    """CLIP preprocessing at `IMAGE_SIZE`: resize the short side, centre crop, scale to [0, 1], CLIP normalisation."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )


def build_processor() -> LlavaProcessor:
    """`LlavaProcessor` that expands each `<image>` into `NUM_IMAGE_TOKENS` image tokens."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP CLS token, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """`LlavaConfig` for `spec`, with the tokenizer's vocabulary and special token ids."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_model(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA (float32, SDPA attention), seeded with `seed`."""
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float()
