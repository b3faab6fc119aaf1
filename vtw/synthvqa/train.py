"""Train the embedded tiny LLaVA on the synthetic train split and save it (``python -m vtw.synthvqa.train``).

Two stages, as LLaVA is trained: stage 1 (`pretrain_vision`) trains the vision tower and projector to label every
patch; stage 2 freezes the tower and trains projector + decoder on multi-turn conversations about each training
image (the item's question, then up to `follow_ups` further questions about the same image). The loss covers the
answer tokens and the closing `</s>` only.

Attention guidance (`guide_weight`, `guide_layers`): a decoder trained from scratch for ten CPU minutes learns to
pool the vision tokens (enough when the scene holds one object) long before it learns to pick one object out of
two, and stalls near 50% on "What color is the circle?" with a square beside it. So stage 2 adds a loss on two
attention heads, which is what makes the binding questions learnable in this budget: head 0 of the first guided
layer, from the word that names the object ("circle", "red", "left", "larger"), should attend to that object's
vision tokens (counting: evenly to every object's centre token and `<s>`); head 0 of the second, from the position
that predicts the answer, should attend to that word. The other heads and layers are free. The answer still has
to come out of the whole network; the guidance only says where to look.

Withdrawal-aware curriculum (`withdraw_prob`, `withdraw_min_layer`): with probability `withdraw_prob` a training
sample is run as if VTW withdrew the vision tokens before a layer K drawn uniformly from
`withdraw_min_layer .. L-1`; in layers >= K its text tokens cannot attend to vision tokens (for the text tokens this
is exactly what withdrawal computes, with positions kept). The loss then asks for the right answer anyway, so the
decoder learns to move what it needs from the image into the text tokens within its first layers, the "information
migration" the VTW paper observes in LLaVA-1.5. The default range starts at K = 0, where the image is out of reach:
those samples teach the decoder to answer with a word of the asked kind anyway (its blind guess), as a large language
model does, so that withdrawing at K = 0 gives chance accuracy rather than malformed answers.

`--plain` trains the same recipe without the curriculum (`withdraw_prob` 0; same seed, data, stages and guidance)
into `vtw/assets/tiny-llava-plain`, an ordinary MLLM to compare with: its baseline is as good (0.980 vs 0.974), but
it keeps reading the vision tokens in its later layers for counting (count accuracy 0.44 withdrawn before layer 2 vs
0.91 with every layer), so its curve over K comes within one point of the baseline at K = 5 rather than 3, and at
K = 0 it answers malformed strings (0.012).

Determinism: fixed torch seed, train items drawn in order from the train split (`generator.make_item("train", i)`;
every item is seen once, so the running accuracy in the progress bar is measured on items the model has not trained
on yet), a fixed learning-rate schedule; results depend slightly on the torch thread count (`--threads`). On a
2-core CPU the default run takes about 13 minutes.

The checkpoint directory is written atomically: everything is saved to a sibling temporary directory which then
replaces the target.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import rotate_half

from vtw.synthvqa.generator import (
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    SynthItem,
    follow_up_turns,
    make_item,
    question_referent,
)
from vtw.synthvqa.model import NUM_IMAGE_TOKENS, PATCH_SIZE, TinyLlavaSpec, build_model, build_processor

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava"
PLAIN_OUTPUT = DEFAULT_OUTPUT.with_name("tiny-llava-plain")
"""Where `--plain` writes: the same recipe without the withdrawal curriculum (`withdraw_prob` = 0)."""
VISION_ITEM_OFFSET = 500_000_000
"""Stage 1 draws its scenes from train items `VISION_ITEM_OFFSET + i` (still the train split, unused by stage 2)."""
PATCH_TARGETS: dict[str, int] = {
    "color": 1 + len(COLORS),
    "shape": 1 + len(SHAPES),
    "size": 4,
    "centre": 2,
    "column": GRID,
    "row": GRID,
    "color_shape": 1 + len(COLORS) * len(SHAPES),
    "color_size": 1 + len(COLORS) * 3,
    "color_x_half": 1 + len(COLORS) * 2,
    "color_y_half": 1 + len(COLORS) * 2,
    "x_half": 3,
    "y_half": 3,
}
"""Stage 1 labels per patch and their class counts (for the first four, class 0 = background / no)."""
WORD_TARGETS: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES}
"""Stage 1 targets scored against the decoder's embeddings of these words (class 0, background, by a learnt vector)."""


def check_schedule(config) -> None:
    """The checks every trainer's config shares (``withdraw_prob``, ``guide_weight``, ``warmup_steps`` against
    ``steps``): ``ValueError`` naming the config class, the field and the value."""
    name = type(config).__name__
    if not 0.0 <= config.withdraw_prob <= 1.0:
        raise ValueError(f"{name}.withdraw_prob must be in [0, 1], got {config.withdraw_prob!r}")
    if config.guide_weight < 0:
        raise ValueError(f"{name}.guide_weight must be >= 0, got {config.guide_weight!r}")
    if not 0 <= config.warmup_steps < config.steps:
        raise ValueError(f"{name}.warmup_steps must be in [0, steps), got {config.warmup_steps!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all of them; the run is a function of this and the thread count)."""

    steps: int = 700
    batch_size: int = 32
    vision_steps: int = 350
    vision_batch_size: int = 64
    vision_lr: float = 3e-3
    follow_ups: int = 5
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    withdraw_prob: float = 0.25
    withdraw_min_layer: int = 0
    guide_weight: float = 1.0
    guide_layers: tuple[int, int] = (0, 1)
    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {value!r}")
        check_schedule(self)
        if not 0 <= self.withdraw_min_layer < self.spec.text_layers:
            raise ValueError(
                f"TrainConfig.withdraw_min_layer must be in [0, {self.spec.text_layers - 1}], "
                f"got {self.withdraw_min_layer!r}"
            )
        find, relay = self.guide_layers
        if not 0 <= find < relay < self.spec.text_layers:
            raise ValueError(
                f"TrainConfig.guide_layers must be (find, relay) with 0 <= find < relay < {self.spec.text_layers}, "
                f"got {self.guide_layers!r}"
            )


@dataclass(frozen=True)
class Batch:
    """A training batch (right-padded).

    input_ids, attention_mask, labels: (B, T) — labels are -100 except on the answer tokens and `</s>`.
    pixel_values: (B, 3, IMAGE_SIZE, IMAGE_SIZE) float32.
    find_queries: (N, 2) long (row, position) of the word naming a question's referent ("circle", "red", "left",
    "larger"; "many" in counting questions); find_targets: (N, T) bool, the vision tokens of that object (for
    counting: the vision token holding each object's centre, and `<s>` at position 0). find_spread: (N,) bool, True
    for counting rows, whose attention should be spread evenly over their targets (the share left on `<s>`, 1 / (n +
    1), then says how many objects there are); other rows only need their mass on the targets. relay_queries: (N, 2)
    long, the position that predicts the answer's first token (the `:` after `ASSISTANT`); relay_targets: (N, T)
    bool, the naming word. One row per question turn.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    find_spread: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    find_queries: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))
    find_targets: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    relay_queries: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))
    relay_targets: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))


@dataclass(frozen=True)
class TrainReport:
    """What a run did: its config, wall time (both stages), and the running accuracy of the last 100 steps (first
    answer token)."""

    config: TrainConfig
    seconds: float
    final_loss: float
    recent_accuracy: float


def pixel_values(processor: LlavaProcessor, images: Sequence) -> torch.Tensor:
    """(B, 3, H, W) CLIP-normalised pixels for `IMAGE_SIZE` square RGB images.

    Equal to what `processor.image_processor` returns for such images (their resize and crop are identities), at a
    fraction of the cost; other sizes are rejected.
    """
    arrays = []
    for image in images:
        if image.size != (IMAGE_SIZE, IMAGE_SIZE) or image.mode != "RGB":
            raise ValueError(f"expected RGB {IMAGE_SIZE}x{IMAGE_SIZE} images, got {image.mode} {image.size}")
        arrays.append(np.asarray(image))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(processor.image_processor.image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(processor.image_processor.image_std, dtype=torch.float32)[None, :, None, None]
    return (x - mean) / std


def patch_owner(scene: Scene) -> np.ndarray:
    """(NUM_IMAGE_TOKENS,) int64, row-major: `k + 1` if `scene.objects[k]` covers most of the patch's object pixels
    and at least 15% of the patch, else 0 (background)."""
    ids = np.asarray(scene.object_map()).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3)
    ids = ids.reshape(GRID * GRID, PATCH_SIZE * PATCH_SIZE)
    counts = np.stack([(ids == k).sum(axis=1) for k in range(len(scene.objects) + 1)], axis=1)  # (P, 1 + n)
    owner = counts[:, 1:].argmax(axis=1) + 1
    owner[counts[:, 1:].max(axis=1) < 0.15 * PATCH_SIZE * PATCH_SIZE] = 0
    return owner.astype(np.int64)


def centre_patches(scene: Scene) -> np.ndarray:
    """(n_objects,) int64: the row-major index of the patch holding each object's centre pixel."""
    return np.asarray([(obj.cy // PATCH_SIZE) * GRID + obj.cx // PATCH_SIZE for obj in scene.objects], dtype=np.int64)


def patch_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Per-patch labels of a scene, each (NUM_IMAGE_TOKENS,) int64 in row-major patch order.

    A patch belongs to the object covering most of its pixels if that object covers at least 15% of it, else to the
    background (class 0). color: 1 + index in COLORS; shape: 1 + index in SHAPES; size: the object's side in
    grid cells (1..3); centre: 1 if the object's centre pixel lies in the patch; column, row: the patch's own grid
    coordinates (0..11), so that the vision tokens keep where they are in a linearly readable form. The last four
    bind the colour to another property of the same object, as one class per pair (1 + ...): colour x shape,
    colour x size, colour x the half of the image (left/right, top/bottom) holding the object's centre. A pooled
    (averaged) view of the tokens then still tells which colour goes with which shape, size or side. x_half, y_half:
    1 + which half (left/right, top/bottom) holds the centre of the patch's object (0: background), so that "left"
    can find an object by content (the decoder's 1-D positions only tell rows apart easily).
    """
    owner = patch_owner(scene)
    color_index = {name: i for i, name in enumerate(COLORS)}
    table = np.zeros((len(scene.objects) + 1, 9), dtype=np.int64)
    half = IMAGE_SIZE // 2
    for k, obj in enumerate(scene.objects, start=1):
        color, shape, span = color_index[obj.color], SHAPES.index(obj.shape), (obj.size + CELL - 1) // CELL
        table[k] = (
            1 + color,
            1 + shape,
            span,
            1 + color * len(SHAPES) + shape,
            1 + color * 3 + span - 1,
            1 + color * 2 + int(obj.cx >= half),
            1 + color * 2 + int(obj.cy >= half),
            1 + int(obj.cx >= half),
            1 + int(obj.cy >= half),
        )
    centre = np.zeros(GRID * GRID, dtype=np.int64)
    centre[centre_patches(scene)] = 1
    cells = np.arange(GRID * GRID, dtype=np.int64)
    return {
        "color": table[owner, 0],
        "shape": table[owner, 1],
        "size": table[owner, 2],
        "centre": centre,
        "column": cells % GRID,
        "row": cells // GRID,
        "color_shape": table[owner, 3],
        "color_size": table[owner, 4],
        "color_x_half": table[owner, 5],
        "color_y_half": table[owner, 6],
        "x_half": table[owner, 7],
        "y_half": table[owner, 8],
    }


def pretrain_vision(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, config: TrainConfig, progress: bool = True
) -> float:
    """Stage 1: train the vision tower and the projector to label every patch (`PATCH_TARGETS`).

    The labels are read from each projected vision token after a parameter-free RMSNorm, i.e. what the decoder's
    first `input_layernorm` sees (up to its gain). Colour and shape are scored by cosine similarity with the
    decoder's own (initial, frozen here) embeddings of the words `red`, `circle`, ..., so a red circle's vision tokens
    point along the embeddings of "red" and "circle": the decoder meets the image in its own vocabulary, as LLaVA's
    first stage aligns CLIP features with the LLM's word embeddings. The other labels use linear heads. All heads
    are thrown away afterwards. Returns the mean foreground accuracy of the object labels over the last 20 steps.
    """
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    tokenizer = processor.tokenizer
    width = model.config.text_config.hidden_size
    norm = nn.RMSNorm(width, eps=model.config.text_config.rms_norm_eps, elementwise_affine=False)
    embeddings = model.get_input_embeddings().weight.detach()
    words = {name: embeddings[tokenizer.convert_tokens_to_ids(list(ws))] for name, ws in WORD_TARGETS.items()}
    backgrounds = nn.ParameterDict({name: nn.Parameter(torch.zeros(1, width)) for name in WORD_TARGETS})
    scale = nn.Parameter(torch.tensor(10.0))
    heads = nn.ModuleDict({n: nn.Linear(width, k) for n, k in PATCH_TARGETS.items() if n not in WORD_TARGETS})
    params = [*tower.parameters(), *projector.parameters(), *backgrounds.parameters(), scale, *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    schedule = TrainConfig(
        steps=config.vision_steps, lr=config.vision_lr, warmup_steps=min(20, config.vision_steps - 1), spec=config.spec
    )
    recent: list[float] = []
    bar = tqdm(range(config.vision_steps), desc="stage 1: vision tower + projector", unit="step", disable=not progress)
    for step in bar:
        first = VISION_ITEM_OFFSET + step * config.vision_batch_size
        scenes = [make_item("train", first + j).scene for j in range(config.vision_batch_size)]
        pixels = pixel_values(processor, [scene.render() for scene in scenes])
        per_scene = [patch_targets(scene) for scene in scenes]
        targets = {name: torch.from_numpy(np.stack([t[name] for t in per_scene])) for name in PATCH_TARGETS}  # (B, P)
        hidden = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        tokens = norm(projector(hidden))  # (B, P, D)
        unit = nn.functional.normalize(tokens, dim=-1)
        loss = torch.zeros(())
        correct = []
        foreground = targets["color"] > 0
        for name, target in targets.items():
            if name in WORD_TARGETS:
                classes = torch.cat([backgrounds[name], words[name]], dim=0)  # (1 + n, D)
                logits = scale * unit @ nn.functional.normalize(classes, dim=-1).T  # (B, P, 1 + n)
            else:
                logits = heads[name](tokens)
            loss = loss + nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
            if name not in ("centre", "column", "row"):
                correct.append((logits.argmax(-1) == target)[foreground].float().mean())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        recent = (recent + [float(torch.stack(correct).mean())])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", patch_acc=f"{sum(recent) / len(recent):.3f}")
    return sum(recent) / max(1, len(recent))


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


def expand_image_tokens(ids: list[int], image_token_id: int) -> list[int]:
    """Replace each `<image>` id by `NUM_IMAGE_TOKENS` copies (what `LlavaProcessor` does to the text)."""
    out: list[int] = []
    for token in ids:
        out.extend([token] * NUM_IMAGE_TOKENS if token == image_token_id else [token])
    return out


def answer_labels(ids: Sequence[int], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Labels for a tokenised conversation: each answer (the tokens after `ASSISTANT :` up to and including `</s>`)
    keeps its ids, everything else is -100."""
    marker = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    labels, inside = [], False
    for index, token in enumerate(ids):
        labels.append(token if inside else -100)
        if inside and token == tokenizer.eos_token_id:
            inside = False
        elif not inside and index >= 1 and [ids[index - 1], token] == marker:
            inside = True
    return labels


def make_batch(processor: LlavaProcessor, items: Sequence[SynthItem], follow_ups: int = 0) -> Batch:
    """Tokenise `items` as conversations (the item's question, then up to `follow_ups` further questions about the
    same image, see `generator.follow_up_turns`), right-pad, mark every answer (+ `</s>`) as labels, and locate the
    attention-guidance rows (see `Batch`)."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    user_id = tokenizer.convert_tokens_to_ids("USER")
    rows, label_rows, guides = [], [], []
    for row, item in enumerate(items):
        turns = [(item.prompt, item.answer), *follow_up_turns(item, follow_ups)]
        ids = expand_image_tokens(tokenizer(conversation_text(tokenizer, turns))["input_ids"], image_id)
        labels = answer_labels(ids, tokenizer)
        rows.append(ids)
        label_rows.append(labels)
        vision_positions = np.flatnonzero(np.asarray(ids) == image_id)
        owner = patch_owner(item.scene)
        user_starts = [i for i, token in enumerate(ids) if token == user_id]
        answer_starts = [i for i in range(1, len(ids)) if labels[i] != -100 and labels[i - 1] == -100]
        for (prompt, _), start, answer in zip(turns, user_starts, answer_starts, strict=True):
            referent = question_referent(item.scene, prompt.split("\n")[0])
            if referent is None:  # counting: the centre patch of every object, and `<s>` (see `Batch`)
                word, targets = "many", np.append(vision_positions[centre_patches(item.scene)], 0)
            else:
                word, targets = referent[0], vision_positions[owner == referent[1] + 1]
            word_id = tokenizer.convert_tokens_to_ids(word)
            position = next(i for i in range(start, answer) if ids[i] == word_id)
            guides.append((row, position, targets, answer - 1, referent is None))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    find_spread = torch.tensor([bool(spread) for _, _, _, _, spread in guides], dtype=torch.bool)
    find_queries = torch.tensor([(row, position) for row, position, *_ in guides], dtype=torch.long).view(-1, 2)
    relay_queries = torch.tensor([(row, query) for row, _, _, query, _ in guides], dtype=torch.long).view(-1, 2)
    find_targets = torch.zeros(len(guides), width, dtype=torch.bool)
    relay_targets = torch.zeros(len(guides), width, dtype=torch.bool)
    for n, (_, position, patches, _, _) in enumerate(guides):
        find_targets[n, torch.from_numpy(patches)] = True
        relay_targets[n, position] = True
    return Batch(
        input_ids,
        attention_mask,
        labels,
        pixel_values(processor, [it.image() for it in items]),
        find_spread,
        find_queries,
        find_targets,
        relay_queries,
        relay_targets,
    )


def head_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    queries: torch.Tensor,
    head: int = 0,
) -> torch.Tensor:
    """Attention probabilities of one head of a Llama decoder layer for a few query positions.

    hidden: (B, T, D) the layer's input; rotary: (cos, sin), each (B, T, head_dim); mask: (B, T, T) bool, True =
    may attend; queries: (N, 2) long (row, position). Returns (N, T): what `layer.self_attn` computes for those
    queries in head `head` (same projections, rotary embedding, scaling and mask).
    """
    attention = layer.self_attn
    dim = attention.head_dim
    kv_head = head // attention.num_key_value_groups
    rows, positions = queries[:, 0], queries[:, 1]
    index = torch.arange(len(rows))
    # Keys are projected per query row (a sample with several queries is projected several times): cheaper once per
    # sample, but that sums the gradients in another order and no longer reproduces the shipped checkpoint's bits.
    normed = layer.input_layernorm(hidden[rows])  # (N, T, D)
    q = attention.q_proj(normed[index, positions])[:, head * dim : (head + 1) * dim]  # (N, hd)
    k = attention.k_proj(normed)[..., kv_head * dim : (kv_head + 1) * dim]  # (N, T, hd)
    cos, sin = rotary[0][rows], rotary[1][rows]  # (N, T, hd)
    q = q * cos[index, positions] + rotate_half(q) * sin[index, positions]
    k = k * cos + rotate_half(k) * sin
    scores = torch.einsum("nd,ntd->nt", q, k) * attention.scaling  # (N, T)
    return scores.masked_fill(~mask[rows, positions], float("-inf")).softmax(dim=-1)


def masked_forward(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    withdraw_layer: torch.Tensor,
    layer_inputs: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hidden states after the decoder's final norm, (B, T, D), with simulated withdrawal.

    withdraw_layer: (B,) long; sample b's text tokens cannot attend to vision tokens in layers >= withdraw_layer[b]
    (L means never). For text positions this equals VTW with kept positions; vision positions are computed but
    are irrelevant to the loss. With every entry equal to L it matches `model(...)` (up to float rounding).
    layer_inputs: if given, filled with {layer index: its input hidden states (B, T, D)} and, under the keys
    "mask" and "rotary", the full (no withdrawal) (B, T, T) bool mask and the (cos, sin) rotary tables.
    """
    inner = model.model
    decoder = inner.language_model
    config = model.config
    ids = batch.input_ids
    embeds = decoder.embed_tokens(ids)
    features = inner.get_image_features(
        pixel_values=batch.pixel_values,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)  # (B * NUM_IMAGE_TOKENS, D)
    vision = ids == config.image_token_id  # (B, T)
    embeds = embeds.masked_scatter(vision[..., None].expand_as(embeds), features)
    return withdrawn_decoder_forward(decoder, embeds, vision, batch.attention_mask, withdraw_layer, layer_inputs)


def withdrawn_decoder_forward(
    decoder: nn.Module,
    embeds: torch.Tensor,
    vision: torch.Tensor,
    attention_mask: torch.Tensor,
    withdraw_layer: torch.Tensor,
    layer_inputs: dict | None = None,
) -> torch.Tensor:
    """The decoder part of :func:`masked_forward` (shared with `vtw.synthvideo.train`): a Llama decoder over
    `embeds` (B, T, D) whose vision positions `vision` (B, T) bool are already filled in; attention_mask (B, T);
    withdraw_layer (B,) long. Returns the hidden states after the final norm, (B, T, D)."""
    batch_size, length = vision.shape
    positions = torch.arange(length, device=embeds.device)[None].expand(batch_size, -1)
    rotary = decoder.rotary_emb(embeds, positions)
    causal = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril()
    full = causal[None] & attention_mask.bool()[:, None, :]  # (B, T_q, T_k)
    withdrawn = full & ~((~vision)[:, :, None] & vision[:, None, :])
    if layer_inputs is not None:
        layer_inputs.update(mask=full, rotary=rotary)
    hidden = embeds
    for index, layer in enumerate(decoder.layers):
        if layer_inputs is not None:
            layer_inputs[index] = hidden
        use_withdrawn = (withdraw_layer <= index)[:, None, None]
        mask = torch.where(use_withdrawn, withdrawn, full)[:, None]  # (B, 1, T, T)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
    return decoder.norm(hidden)


def answer_loss(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    withdraw_layer: torch.Tensor,
    guide: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over label tokens, (B,) bool: first answer token predicted correctly by argmax, guidance
    loss).

    guide: (find layer, relay layer) or None. The guidance loss is the mean negative log of the attention mass that
    head 0 of the find layer puts, from each naming word, on the named object's vision tokens (for counting rows:
    the cross-entropy with an even spread over the objects' centre tokens and `<s>`), plus that of the mass head 0
    of the relay layer puts, from the answer position, on the naming word. Rows whose withdrawal layer is <= the relay
    layer are left out (0 when `guide` is None or no row is left).
    """
    inputs: dict = {}
    hidden = masked_forward(model, batch, withdraw_layer, inputs if guide else None)
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V): only the positions that predict a label
    loss = nn.functional.cross_entropy(logits, targets[keep])
    first = keep.float().argmax(dim=1)  # index of each row's first label (rows always have one)
    rows = torch.arange(targets.shape[0])
    first_logits = model.lm_head(hidden[rows, first])
    correct = first_logits.argmax(-1) == targets[rows, first]
    guide_loss = torch.zeros(())
    if guide is not None:
        find, relay = guide
        layers = model.model.language_model.layers
        usable = withdraw_layer[batch.find_queries[:, 0]] > relay  # (N,)
        if bool(usable.any()):

            def attention(layer: int, queries: torch.Tensor) -> torch.Tensor:
                return head_attention(layers[layer], inputs[layer], inputs["rotary"], inputs["mask"], queries[usable])

            probs, wanted = attention(find, batch.find_queries), batch.find_targets[usable]
            find_loss = -torch.log((probs * wanted).sum(dim=-1).clamp_min(1e-6))  # (N,) mass on the object
            even = wanted.float() / wanted.float().sum(dim=-1, keepdim=True)  # counting: spread evenly
            spread_loss = -(even * torch.log(probs.clamp_min(1e-6))).sum(dim=-1)
            find_loss = torch.where(batch.find_spread[usable], spread_loss, find_loss)
            probs, wanted = attention(relay, batch.relay_queries), batch.relay_targets[usable]
            relay_loss = -torch.log((probs * wanted).sum(dim=-1).clamp_min(1e-6))
            guide_loss = find_loss.mean() + relay_loss.mean()
    return loss, correct, guide_loss


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_withdraw_layers(config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """(B,) long withdrawal layer per sample: L (none) or, with `withdraw_prob`, uniform in min_layer..L-1."""
    num_layers = config.spec.text_layers
    draw = torch.rand(config.batch_size, generator=generator) < config.withdraw_prob
    layers = torch.randint(config.withdraw_min_layer, num_layers, (config.batch_size,), generator=generator)
    return torch.where(draw, layers, torch.full_like(layers, num_layers))


def stage_two_optimizer(model: nn.Module, lr: float, weight_decay: float):
    """(AdamW over the parameters that require grad, [(name, parameter)] of those): weight decay on matrices except
    embeddings, none on the rest (shared with `vtw.synthvideo.train`)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    return optimizer, trainable


def train(
    config: TrainConfig, progress: bool = True
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, TrainReport]:
    """Train a fresh tiny LLaVA with `config`; returns the model (eval mode), its processor and a report."""
    torch.manual_seed(config.seed)
    processor = build_processor()
    model = build_model(config.spec, processor.tokenizer, seed=config.seed)
    model.train()
    start = time.perf_counter()
    if config.vision_steps:
        pretrain_vision(model, processor, config, progress)
    model.model.vision_tower.requires_grad_(False)  # stage 2 keeps the vision tower frozen, as LLaVA does
    optimizer, trainable = stage_two_optimizer(model, config.lr, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    recent: list[float] = []
    loss_value = float("nan")
    bar = tqdm(range(config.steps), desc="train tiny-llava", unit="step", disable=not progress)
    guide = config.guide_layers if config.guide_weight > 0 else None
    for step in bar:
        items = [make_item("train", step * config.batch_size + j) for j in range(config.batch_size)]
        batch = make_batch(processor, items, config.follow_ups)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss, correct, guide_loss = answer_loss(model, batch, sample_withdraw_layers(config, generator), guide)
        optimizer.zero_grad(set_to_none=True)
        (loss + config.guide_weight * guide_loss).backward()
        nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        recent = (recent + [float(correct.float().mean())])[-100:]
        bar.set_postfix(
            loss=f"{loss_value:.3f}", guide=f"{guide_loss.item():.3f}", acc=f"{sum(recent) / len(recent):.3f}"
        )
    model.eval()
    model.model.vision_tower.requires_grad_(True)
    report = TrainReport(config, time.perf_counter() - start, loss_value, sum(recent) / max(1, len(recent)))
    return model, processor, report


def save_checkpoint(model: LlavaForConditionalGeneration, processor: LlavaProcessor, output: Path) -> None:
    """Save model + processor to `output` atomically (sibling temp dir, then rename over the target)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def training_arguments(prog: str, doc: str, defaults, output: Path) -> argparse.ArgumentParser:
    """The CLI options both trainers share (`defaults`: a config with steps, batch_size, lr, vision_steps, seed,
    withdraw_prob, guide_weight), with `output` as the default checkpoint directory (shared with
    `vtw.synthvideo.train`)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=output, help="checkpoint directory (replaced)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--withdraw-prob", type=float, default=defaults.withdraw_prob)
    parser.add_argument("--guide-weight", type=float, default=defaults.guide_weight, help="0 turns guidance off")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it slightly)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, Path, int]:
    """CLI -> (TrainConfig, output directory, torch thread count)."""
    defaults = TrainConfig()
    parser = training_arguments("python -m vtw.synthvqa.train", __doc__, defaults, DEFAULT_OUTPUT)
    parser.add_argument("--withdraw-min-layer", type=int, default=defaults.withdraw_min_layer)
    parser.add_argument(
        "--plain",
        action="store_true",
        help=f"train like an ordinary MLLM: no withdrawal curriculum (withdraw_prob 0), default --output {PLAIN_OUTPUT}",
    )
    parser.set_defaults(output=None, withdraw_prob=None)
    args = parser.parse_args(argv)
    if args.plain and args.withdraw_prob not in (None, 0.0):
        raise ValueError(f"--plain trains without the withdrawal curriculum, got --withdraw-prob {args.withdraw_prob}")
    withdraw_prob = (
        args.withdraw_prob if args.withdraw_prob is not None else 0.0 if args.plain else defaults.withdraw_prob
    )
    output = args.output or (PLAIN_OUTPUT if args.plain else DEFAULT_OUTPUT)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_steps=args.vision_steps,
        seed=args.seed,
        withdraw_prob=withdraw_prob,
        withdraw_min_layer=args.withdraw_min_layer,
        guide_weight=args.guide_weight,
        warmup_steps=min(defaults.warmup_steps, args.steps - 1),
    )
    if args.threads <= 0:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return config, output, args.threads


def main(argv: Sequence[str] | None = None) -> TrainReport:
    config, output, threads = parse_args(argv)
    torch.set_num_threads(threads)
    model, processor, report = train(config)
    save_checkpoint(model, processor, output)
    print(f"saved {output} after {report.seconds:.0f} s; loss {report.final_loss:.4f}, ", end="")
    print(f"running first-token accuracy (last 100 steps) {report.recent_accuracy:.3f}")
    print(f"config: {asdict(config)}")
    return report


if __name__ == "__main__":
    main()
