"""Train the tiny Video-LLaVA on the synthetic video train split and save it (``python -m vtw_train synthvideo``).

The recipe of :mod:`vtw_train.synthvqa` (the generic half in :mod:`vtw_train.core`), for clips (8 frames of 64 x 64 px, 16 px patches: 16 patch tokens + CLS per
frame, 136 vision tokens per clip):

- Stage 1 (`pretrain_vision`) trains the video tower and the projector on single frames to label every patch with
  the shape and colour of the object covering it and the column / row bin (8 px) of that object's centre, and the
  CLS token with the shapes present in the frame (linear heads on the RMS-normalised projected tokens, thrown away
  afterwards). One frame cannot tell motion, order or counts; these labels give the decoder what it needs per frame.
- Stage 2 freezes the tower and trains projector + decoder on the clip questions (answer word and ``</s>``), with
  attention guidance (as synthvqa): heads 0 and 1 of decoder layer 0, from the question's naming word (the moving
  shape's name, ``first``, ``flash``), attend to the vision tokens that hold the answer (direction: the moving
  shape's patches in the first frame (head 0) and in the last (head 1); order: the first shape's patches in the frames
  where it is alone; flash: spread evenly over the 8 CLS tokens, whose "square present" bit then averages to the
  count / 8); head 0 of layer 1, from the position that predicts the answer, attends to the naming word. Without
  guidance (a 10-minute end-to-end try, docs/DESIGN.md) the loss stays at ln 4.
- Withdrawal-aware curriculum (`withdraw_prob`): a sample's text tokens cannot attend to the vision tokens from a
  layer K drawn uniformly in 0 .. L-1 (VTW with kept positions), so the answer has to move into the text tokens
  early, and K = 0 gives a blind guess of the right kind.

Determinism: fixed seeds, train items in order (`generator.make_item("train", i)`; stage 1 uses items from
`VISION_ITEM_OFFSET`), so the running accuracies shown are on items not trained on yet; results depend slightly on
the torch thread count (`--threads`, default 2: about 6 minutes on a 2-core CPU). Train frames are rendered in memory
and normalised by :func:`pixel_values_videos`, which equals the checkpoint's video processor on 64 px frames;
evaluation reads the task's MP4 files. The checkpoint directory is written atomically
(:func:`vtw_train.core.save_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers as T
from torch import nn

from vtw.synthvideo import generator as G
from vtw.synthvideo.configs import TINY_IMAGE_ID, TINY_VIDEO_ID, TINY_VOCAB
from vtw.synthvideo.tiny import ASSET_DIR, VIDEO_CHAT_TEMPLATE, build_processor, build_tokenizer, prompt_text
from vtw.synthvqa.generator import COLORS, SHAPES, SceneObject
from vtw_train import core

FRAME_SIZE = G.CANVAS
PATCH = 16
GRID = FRAME_SIZE // PATCH
NUM_PATCHES = GRID * GRID
FRAME_TOKENS = NUM_PATCHES + 1
"""Vision tokens per frame: Video-LLaVA keeps the CLS token of every frame."""
CLIP_TOKENS = G.FRAMES * FRAME_TOKENS
BIN = 8
"""Pixels per column / row bin of an object's centre (stage 1 labels 1 .. FRAME_SIZE // BIN; 0 = background)."""
VISION_ITEM_OFFSET = 500_000_000
MIN_OVERLAP = 24
"""Pixels of an object's box a patch must hold to belong to it (of the box's 144)."""
FIND_WORDS: dict[str, str | None] = {"direction": None, "order": "first", "flash": "flash"}
"""The naming word of each question kind (None: the moving shape's name, the question's second to last word)."""


@dataclass(frozen=True)
class VideoTrainConfig(core.TrainConfig):
    """Every hyper-parameter of a run (the run is a function of this and the thread count): :class:`core.TrainConfig`'s
    (other defaults), stage 1's clips per step, and the model's sizes."""

    steps: int = 1500
    vision_steps: int = 3000
    """The two defaults that differ from :class:`core.TrainConfig`'s (synthvqa's)."""
    vision_clips: int = 8
    text_width: int = 64
    text_layers: int = 4
    vision_width: int = 64
    vision_layers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vision_clips", "text_width", "vision_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VideoTrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.text_layers < 2:  # guidance uses layers 0 and 1
            raise ValueError(f"VideoTrainConfig.text_layers must be >= 2, got {self.text_layers!r}")
        if self.vision_layers < 2:  # vision_feature_layer = -2
            raise ValueError(f"VideoTrainConfig.vision_layers must be >= 2, got {self.vision_layers!r}")
        if self.text_width % 4 or self.vision_width % 4:
            raise ValueError(f"widths must be multiples of the 4 heads, got {self.text_width}, {self.vision_width}")
        self.check_withdraw_min_layer()

    @property
    def decoder_layers(self) -> int:
        return self.text_layers


def build_model(config: VideoTrainConfig, tokenizer) -> T.VideoLlavaForConditionalGeneration:
    """A fresh `VideoLlavaForConditionalGeneration` (seeded by the caller): CLIP towers on 64 px frames, 16 px
    patches, `vision_layers` x `vision_width`; a Llama decoder of `text_layers` x `text_width`, 4 heads; initial
    decoder weights of std 1/sqrt(width) (as synthvqa's `init_std`)."""
    text = T.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=config.text_width, intermediate_size=3 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False, initializer_range=1 / math.sqrt(config.text_width),
    )  # fmt: skip
    vision = T.CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=2 * config.vision_width, num_attention_heads=4,
        num_hidden_layers=config.vision_layers, image_size=FRAME_SIZE, patch_size=PATCH,
        projection_dim=config.vision_width,
    )  # fmt: skip
    cfg = T.VideoLlavaConfig(
        text_config=text, vision_config=vision, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_token_index=TINY_IMAGE_ID, video_token_index=TINY_VIDEO_ID, image_seq_length=NUM_PATCHES,
        video_seq_length=CLIP_TOKENS, tie_word_embeddings=False,
    )  # fmt: skip
    ids = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    for c in (cfg, cfg.text_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = ids
    model = T.VideoLlavaForConditionalGeneration(cfg)
    model.generation_config = T.GenerationConfig(
        bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2],
        suppress_tokens=[TINY_IMAGE_ID, TINY_VIDEO_ID, ids[0], ids[2], tokenizer.unk_token_id],
    )  # fmt: skip
    return model


def pixel_values_videos(processor, clips: np.ndarray) -> torch.Tensor:
    """(B, F, 64, 64, 3) uint8 RGB -> (B, F, 3, 64, 64) float32, CLIP-normalised: what the processor's video
    processor returns for such clips (its resize and crop are identities at 64 px), without its per-frame cost."""
    if clips.ndim != 5 or clips.shape[2:] != (FRAME_SIZE, FRAME_SIZE, 3) or clips.dtype != np.uint8:
        raise ValueError(f"expected (B, F, {FRAME_SIZE}, {FRAME_SIZE}, 3) uint8 clips, got {clips.shape} {clips.dtype}")
    return core.normalized_pixels(clips, 2, processor.video_processor)


def patch_owner(objects: Sequence[SceneObject]) -> np.ndarray:
    """(NUM_PATCHES,) int64, row-major: `k + 1` for the object `objects[k]` whose box covers most of the patch (at
    least `MIN_OVERLAP` pixels; the first such object on ties), else 0."""
    owner = np.zeros(NUM_PATCHES, dtype=np.int64)
    best = np.zeros(NUM_PATCHES, dtype=np.int64)
    starts = np.arange(NUM_PATCHES)
    px, py = (starts % GRID) * PATCH, (starts // GRID) * PATCH
    for k, obj in enumerate(objects):
        left, top, right, bottom = obj.box
        ox = np.clip(np.minimum(right + 1, px + PATCH) - np.maximum(left, px), 0, None)
        oy = np.clip(np.minimum(bottom + 1, py + PATCH) - np.maximum(top, py), 0, None)
        area = ox * oy
        take = (area >= MIN_OVERLAP) & (area > best)
        owner[take], best[take] = k + 1, area[take]
    return owner


def frame_targets(objects: Sequence[SceneObject]) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 labels of one frame: ((NUM_PATCHES, 4) int64 per patch: 1 + shape index, 1 + colour index, 1 + column
    bin and 1 + row bin of the owning object's centre, all 0 on background; (len(SHAPES),) float32 multi-hot of the
    shapes in the frame, for the CLS token)."""
    colors = list(COLORS)
    table = np.zeros((len(objects) + 1, 4), dtype=np.int64)
    present = np.zeros(len(SHAPES), dtype=np.float32)
    for k, obj in enumerate(objects, start=1):
        table[k] = (1 + SHAPES.index(obj.shape), 1 + colors.index(obj.color), 1 + obj.cx // BIN, 1 + obj.cy // BIN)
        present[SHAPES.index(obj.shape)] = 1.0
    return table[patch_owner(objects)], present


def video_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B * F, FRAME_TOKENS, D): the projected vision tokens, as the model computes them."""
    return model.model.get_video_features(
        pixel_values_videos=pixels, vision_feature_layer=model.config.vision_feature_layer, output_hidden_states=True
    ).pooler_output


def pretrain_vision(model, processor, config: VideoTrainConfig, progress: bool = True) -> float:
    """Stage 1: train the video tower and projector on the `frame_targets` of single frames (`vision_clips` clips x
    8 frames per step). Returns the foreground shape accuracy per patch over the last 20 steps."""
    model.model.image_tower.requires_grad_(False)  # Video-LLaVA's image tower does not see clips
    tower, projector = model.model.video_tower, model.model.multi_modal_projector
    width = config.text_width
    norm = nn.RMSNorm(width, eps=model.config.text_config.rms_norm_eps, elementwise_affine=False)
    bins = FRAME_SIZE // BIN + 1
    heads = nn.ModuleList([nn.Linear(width, n) for n in (1 + len(SHAPES), 1 + len(COLORS), bins, bins)])
    present_head = nn.Linear(width, len(SHAPES))
    params = [*tower.parameters(), *projector.parameters(), *heads.parameters(), *present_head.parameters()]

    def step_loss(step: int):
        first = VISION_ITEM_OFFSET + step * config.vision_clips
        items = [G.make_item("train", first + j) for j in range(config.vision_clips)]
        labels, present = zip(*(frame_targets(objects) for item in items for objects in item.frames))
        labels, present = torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(present))  # (N, P, 4), (N, S)
        tokens = norm(video_features(model, pixel_values_videos(processor, np.stack([i.render() for i in items]))))
        patches = tokens[:, 1:]  # (N, P, D)
        loss = nn.functional.binary_cross_entropy_with_logits(present_head(tokens[:, 0]), present)
        for i, head in enumerate(heads):
            target = labels[..., i].flatten()
            weight = torch.where(target > 0, 1.0, 0.3)  # background patches are the majority
            loss = (
                loss
                + (nn.functional.cross_entropy(head(patches).flatten(0, 1), target, reduction="none") * weight).mean()
            )
        foreground = labels[..., 0] > 0
        return loss, lambda: (heads[0](patches).argmax(-1) == labels[..., 0])[foreground].float().mean().item()

    return core.pretrain_vision(params, step_loss, config, "stage 1: video tower + projector", progress)


@dataclass(frozen=True)
class VideoBatch:
    """A stage 2 batch (right-padded), B clips.

    input_ids, attention_mask, labels: (B, T) (labels -100 except on the answer word and `</s>`); pixels: (B, F, 3,
    64, 64). find_queries: (B, 2) long (row, position of the naming word); find_targets: (2, B, T) bool, the vision
    tokens heads 0 and 1 of layer 0 should attend to from it; find_spread: (B,) bool, rows whose attention should be
    spread evenly over the targets (flash) rather than only lie on them; relay_queries: (B, 2) long, the position
    that predicts the answer; relay_targets: (B, T) bool, the naming word; kinds: the items' question kinds.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixels: torch.Tensor
    find_queries: torch.Tensor
    find_targets: torch.Tensor
    find_spread: torch.Tensor
    relay_queries: torch.Tensor
    relay_targets: torch.Tensor
    kinds: tuple[str, ...] = ()
    """The items' question kinds (for the running accuracy per kind)."""


def guide_targets(item: G.ClipItem, video_start: int) -> tuple[list[int], list[int], bool]:
    """Positions (in the expanded sequence whose first vision token is at `video_start`) for heads 0 and 1 of the
    find layer, and whether to spread (see `VideoBatch`)."""

    def patches(frame: int, owner_id: int) -> list[int]:
        base = video_start + frame * FRAME_TOKENS + 1
        return [base + p for p in np.flatnonzero(patch_owner(item.frames[frame]) == owner_id).tolist()]

    cls = [video_start + f * FRAME_TOKENS for f in range(G.FRAMES)]
    if item.kind == "direction":  # the moving shape is the second object of every frame
        first, last = patches(0, 2), patches(G.FRAMES - 1, 2)
        return (first, last, False) if first and last else (cls, cls, True)
    if item.kind == "order":  # frames where only the first shape is visible
        alone = [p for f, objects in enumerate(item.frames) if len(objects) == 1 for p in patches(f, 1)]
        return (alone, alone, False) if alone else (cls, cls, True)
    return cls, cls, True


def make_batch(processor, items: Sequence[G.ClipItem]) -> VideoBatch:
    """Tokenise `items` (the prompt of :func:`prompt_text` with `<video>` expanded to `CLIP_TOKENS` ids, then the
    answer and `</s>`), render their frames, and mark the guidance rows."""
    tok = processor.tokenizer
    rows, label_rows, finds, relays, targets, spreads = [], [], [], [], [], []
    for b, item in enumerate(items):
        prompt: list[int] = []
        for t in tok(prompt_text(processor, item), add_special_tokens=False)["input_ids"]:
            prompt += [TINY_VIDEO_ID] * CLIP_TOKENS if t == TINY_VIDEO_ID else [t]
        answer = tok(" " + item.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
        word = FIND_WORDS[item.kind] or item.question.split()[-2]
        word_id = tok.convert_tokens_to_ids(word)
        finds.append((b, max(i for i, t in enumerate(prompt) if t == word_id)))
        relays.append((b, len(prompt) - 1))
        head0, head1, spread = guide_targets(item, prompt.index(TINY_VIDEO_ID))
        targets.append((head0, head1))
        spreads.append(spread)
    width = max(map(len, rows))
    batch = len(items)
    input_ids = torch.full((batch, width), tok.pad_token_id)
    labels = torch.full((batch, width), -100)
    attention = torch.zeros(batch, width, dtype=torch.long)
    find_targets = torch.zeros(2, batch, width, dtype=torch.bool)
    relay_targets = torch.zeros(batch, width, dtype=torch.bool)
    for b, (row, lab) in enumerate(zip(rows, label_rows)):
        input_ids[b, : len(row)], labels[b, : len(row)], attention[b, : len(row)] = (
            torch.tensor(row), torch.tensor(lab), 1)  # fmt: skip
        find_targets[0, b, targets[b][0]] = find_targets[1, b, targets[b][1]] = True
        relay_targets[b, finds[b][1]] = True
    return VideoBatch(
        input_ids, attention, labels, pixel_values_videos(processor, np.stack([i.render() for i in items])),
        torch.tensor(finds), find_targets, torch.tensor(spreads), torch.tensor(relays), relay_targets,
        tuple(item.kind for item in items),
    )  # fmt: skip


def masked_forward(model, batch: VideoBatch, withdraw_layer: torch.Tensor, layer_inputs: dict | None = None):
    """Hidden states after the decoder's final norm, (B, T, D), with simulated withdrawal
    (:func:`core.withdrawn_decoder_forward`: sample b's text tokens cannot attend to vision tokens in layers >=
    withdraw_layer[b], L = never; `layer_inputs` filled as there). The video tower runs without gradients (frozen in
    stage 2)."""
    decoder = model.model.language_model
    ids = batch.input_ids
    embeds = decoder.embed_tokens(ids)
    with torch.no_grad():
        hidden = model.model.video_tower(batch.pixels.flatten(0, 1), output_hidden_states=True).hidden_states
    features = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer]).flatten(0, 1)
    vision = ids == model.config.video_token_index  # (B, T)
    embeds = embeds.masked_scatter(vision[..., None].expand_as(embeds), features.to(embeds.dtype))
    return core.withdrawn_decoder_forward(decoder, embeds, vision, batch.attention_mask, withdraw_layer, layer_inputs)


def answer_loss(model, batch: VideoBatch, withdraw_layer: torch.Tensor, guide: bool = True):
    """(cross-entropy over the label tokens, (B,) bool first answer token right by argmax, guidance loss: the mean
    negative log attention mass of heads 0 and 1 of layer 0 on their targets (spread rows: cross-entropy with the
    even spread) plus that of head 0 of layer 1 on the naming word; rows withdrawn at K <= 1 are left out), by
    :func:`core.supervised_losses`."""
    inputs: dict = {}
    hidden = masked_forward(model, batch, withdraw_layer, inputs if guide else None)
    if not guide:
        return core.supervised_losses(model, hidden, batch.labels, withdraw_layer, inputs)
    finds = [(0, head, batch.find_queries, batch.find_targets[head], batch.find_spread) for head in (0, 1)]
    relay = (1, batch.relay_queries, batch.relay_targets)
    return core.supervised_losses(model, hidden, batch.labels, withdraw_layer, inputs, finds, relay)


class SynthVideoTask(core.Task):
    """The synthvideo task for :func:`core.train` (running accuracy: first answer tokens of the last 200 unwithdrawn
    train items per question kind)."""

    name = "tiny-video-llava"

    def __init__(self) -> None:
        self.recent: dict[str, list[bool]] = {kind: [] for kind in G.KINDS}

    def build(self, config: VideoTrainConfig):
        tokenizer = build_tokenizer()
        processor = build_processor("video_llava", tokenizer, VIDEO_CHAT_TEMPLATE, size=FRAME_SIZE, patch=PATCH)
        return build_model(config, tokenizer), processor

    def frozen_towers(self, model):
        return [model.model.video_tower, model.model.image_tower]

    def pretrain_vision(self, model, processor, config, progress):
        return pretrain_vision(model, processor, config, progress)

    def batch(self, processor, config, step):
        items = [G.make_item("train", step * config.batch_size + j) for j in range(config.batch_size)]
        return make_batch(processor, items)

    def loss(self, model, batch, withdraw_layer, config):
        return answer_loss(model, batch, withdraw_layer, config.guide_weight > 0)

    def track(self, batch, correct, withdraw_layer, config):
        for kind, ok, k in zip(batch.kinds, correct.tolist(), withdraw_layer.tolist()):
            if k == config.text_layers:
                self.recent[kind] = (self.recent[kind] + [ok])[-200:]
        self.accuracy = {kind: float(np.mean(v)) if v else float("nan") for kind, v in self.recent.items()}
        return {k[:3]: f"{a:.2f}" for k, a in self.accuracy.items()}


def train(config: VideoTrainConfig, progress: bool = True):
    """Train a fresh tiny Video-LLaVA; returns (model in eval mode, processor, :class:`core.TrainReport`)."""
    return core.train(SynthVideoTask(), config, progress)


def parse_args(argv: Sequence[str] | None = None) -> tuple[VideoTrainConfig, Path, int]:
    """CLI -> (VideoTrainConfig, output directory, torch thread count)."""
    defaults = VideoTrainConfig()
    parser = core.training_arguments("python -m vtw_train synthvideo", __doc__, defaults, ASSET_DIR)
    args = parser.parse_args(argv)
    return VideoTrainConfig(**core.schedule_arguments(args, defaults)), args.output, args.threads


def main(argv: Sequence[str] | None = None) -> core.TrainReport:
    config, output, threads = parse_args(argv)
    return core.run(SynthVideoTask(), config, output, threads)


if __name__ == "__main__":
    main()
