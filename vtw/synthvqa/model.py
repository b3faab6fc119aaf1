"""The tiny LLaVA of the embedded default: config, word-level tokenizer, image processor, processor, chat template.

Architecture (a real `LlavaForConditionalGeneration`, LLaVA-1.5 layout at toy width):

- vision tower: `CLIPVisionModel`, 192 x 192 images, 16 px patches -> 1 CLS + 144 patch tokens,
  `TinyLlavaSpec.vision_layers` layers of width `TinyLlavaSpec.vision_width`; `vision_feature_select_strategy=
  "default"` drops the CLS token, so every image becomes `NUM_IMAGE_TOKENS = 144` vision tokens (`LlavaProcessor`
  expands `<image>` to exactly that many).
- projector: 2-layer MLP with GELU (`LlavaMultiModalProjector`).
- language model: a Llama decoder (`TinyLlavaSpec.text_layers` >= 8 layers of width `text_width`), input and output
  embeddings tied.
- tokenizer: a `PreTrainedTokenizerFast` over a `tokenizers` WordLevel model whose vocabulary is every word the
  generator (`vtw.synthvqa.generator`) and the chat template can write; `<image>` is a special token.
- chat template (LLaVA-1.5 style, no system prompt): `USER: <image>\\n{question} ASSISTANT: {answer}</s>`.
  It accepts a message content either as a string (lmms-eval's `llava_hf` passes `"<image>\\n..."`) or as a list of
  `{"type": "image"}` / `{"type": "text", "text": ...}` parts.
"""

from __future__ import annotations

from collections.abc import Sequence
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

from vtw.synthvqa.generator import CELL, GRID, IMAGE_SIZE, vocabulary

PATCH_SIZE = CELL  # the generator places objects on the vision tower's patch grid
NUM_PATCHES = GRID * GRID
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
    init_std: float = 0.08
    """Std of the decoder's and projector's initial weights: about 1/sqrt(text_width), not Llama's 0.02 (which is
    tuned for widths in the thousands and leaves a 128-wide decoder near a saddle where attention learns slowly)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "init_std":
                if not isinstance(value, float) or not 0.0 < value < 1.0:
                    raise ValueError(f"TinyLlavaSpec.init_std must be a float in (0, 1), got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyLlavaSpec.{name} must be a positive int, got {value!r}")
        if self.text_layers < 8:
            raise ValueError(f"TinyLlavaSpec.text_layers must be >= 8, got {self.text_layers}")
        if self.text_width % self.text_heads or self.vision_width % self.vision_heads:
            raise ValueError(f"widths must divide by head counts, got {self}")
        if self.vision_width % 4:  # grid_position_table: sin and cos of column and of row
            raise ValueError(f"TinyLlavaSpec.vision_width must be a multiple of 4, got {self.vision_width}")


def word_level_tokenizer(vocab: Sequence[str], *, add_bos: bool = True, **kwargs) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer: token id ``i`` is ``vocab[i]``, which must hold `<pad> <s> </s> <unk>`.

    Encoding splits on whitespace and isolates every punctuation character; with `add_bos`, `<s>` is prepended
    (without, the chat template writes it). Decoding joins words with spaces and tidies punctuation. `kwargs` go to
    `PreTrainedTokenizerFast` (more special tokens, chat template, padding side, ...). The tests' tiny checkpoints
    use it too.
    """
    vocab = list(vocab)
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab.index(BOS))]
        )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, **kwargs
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded model's tokenizer (:func:`word_level_tokenizer`): specials `<pad> <s> </s> <unk> <image>`
    (ids 0-4), then chat words, then generator words; `<s>` is prepended."""
    words = list(SPECIAL_TOKENS)
    for word in (*CHAT_WORDS, *vocabulary()):
        if word not in words:
            words.append(word)
    return word_level_tokenizer(
        words,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


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
        initializer_range=spec.init_std,
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def build_model(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA (float32, SDPA attention), seeded with `seed`.

    The vision tower's position embeddings start from `grid_position_table` instead of CLIP's small random init, so
    that from the first step every patch token says where in the image it is (a learnt table, still trained)."""
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            grid_position_table(spec.vision_width, GRID)
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float()


def grid_position_table(width: int, grid: int, amplitude: float = 0.7) -> torch.Tensor:
    """(1 + grid * grid, width) initial position embeddings of a CLIP vision tower: row 0 (the CLS token) is zero,
    row `1 + r * grid + c` (patch in row r, column c) holds sines and cosines of c (first half of the width) and of r
    (second half) at `width // 4` periods from 2 to 4 * grid patches, times `amplitude`."""
    if width % 4:
        raise ValueError(f"width must be a multiple of 4, got {width}")
    quarter = width // 4
    periods = 2.0 * (2.0 * grid) ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))
    cells = torch.arange(grid * grid)
    table = torch.zeros(1 + grid * grid, width, dtype=torch.float64)
    for offset, coordinate in ((0, cells % grid), (2 * quarter, cells // grid)):
        angles = coordinate[:, None].double() * (2 * torch.pi / periods[None])  # (P, quarter)
        table[1:, offset : offset + quarter] = angles.sin()
        table[1:, offset + quarter : offset + 2 * quarter] = angles.cos()
    return (amplitude * table).float()


def conversation_text(
    tokenizer: PreTrainedTokenizerFast, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = False
) -> str:
    """Chat-template text of a conversation about one image: `turns` are (prompt, answer) pairs; the first user turn
    carries the `<image>`. With `add_generation_prompt` the last answer is left out and the text ends in `ASSISTANT:`.
    """
    messages: list[dict] = []
    for index, (prompt, answer) in enumerate(turns):
        text = {"type": "text", "text": prompt}
        messages.append({"role": "user", "content": [{"type": "image"}, text] if index == 0 else [text]})
        if not (add_generation_prompt and index == len(turns) - 1):
            messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
