"""Train the tiny Video-LLaVA on the synthetic video train split and save it (``python -m vtw.synthvideo.train``).

The recipe of `vtw.synthvqa.train`, for clips (8 frames of 64 x 64 px, 16 px patches: 16 patch tokens + CLS per
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
the torch thread count (`--threads`, default 2: about 7 minutes on a 2-core CPU). Train frames are rendered in memory
and normalised by :func:`pixel_values_videos`, which equals the checkpoint's video processor on 64 px frames;
evaluation reads the task's MP4 files. The checkpoint directory is written atomically
(:func:`vtw.synthvqa.train.save_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers as T
from torch import nn
from tqdm import tqdm

from vtw.families import TINY_IMAGE_ID, TINY_VIDEO_ID, TINY_VOCAB
from vtw.synthvideo import generator as G
from vtw.synthvideo.tiny import ASSET_DIR, VIDEO_CHAT_TEMPLATE, build_processor, build_tokenizer
from vtw.synthvqa.generator import COLORS, SHAPES, SceneObject
from vtw.synthvqa.train import (
    check_schedule,
    head_attention,
    learning_rate,
    save_checkpoint,
    stage_two_optimizer,
    training_arguments,
    withdrawn_decoder_forward,
)

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
class VideoTrainConfig:
    """Every hyper-parameter of a run (the run is a function of this and the thread count)."""

    steps: int = 1500
    batch_size: int = 32
    vision_steps: int = 3000
    vision_clips: int = 8
    vision_lr: float = 3e-3
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    withdraw_prob: float = 0.25
    guide_weight: float = 1.0
    text_width: int = 64
    text_layers: int = 4
    vision_width: int = 64
    vision_layers: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "vision_clips", "text_width", "vision_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VideoTrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.vision_steps < 0:
            raise ValueError(f"VideoTrainConfig.vision_steps must be >= 0, got {self.vision_steps!r}")
        if self.text_layers < 2:  # guidance uses layers 0 and 1
            raise ValueError(f"VideoTrainConfig.text_layers must be >= 2, got {self.text_layers!r}")
        if self.vision_layers < 2:  # vision_feature_layer = -2
            raise ValueError(f"VideoTrainConfig.vision_layers must be >= 2, got {self.vision_layers!r}")
        if self.text_width % 4 or self.vision_width % 4:
            raise ValueError(f"widths must be multiples of the 4 heads, got {self.text_width}, {self.vision_width}")
        check_schedule(self)


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
    vp = processor.video_processor
    x = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255.0
    mean = torch.tensor(vp.image_mean, dtype=torch.float32)[None, None, :, None, None]
    std = torch.tensor(vp.image_std, dtype=torch.float32)[None, None, :, None, None]
    return (x - mean) / std


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
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    schedule = dataclasses.replace(
        config, steps=config.vision_steps, lr=config.vision_lr, warmup_steps=min(20, config.vision_steps - 1)
    )
    recent: list[float] = []
    bar = tqdm(range(config.vision_steps), desc="stage 1: video tower + projector", unit="step", disable=not progress)
    for step in bar:
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
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        foreground = labels[..., 0] > 0
        recent = (recent + [(heads[0](patches).argmax(-1) == labels[..., 0])[foreground].float().mean().item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", shape_acc=f"{np.mean(recent):.3f}")
    return float(np.mean(recent)) if recent else float("nan")


@dataclass(frozen=True)
class VideoBatch:
    """A stage 2 batch (right-padded), B clips.

    input_ids, attention_mask, labels: (B, T) (labels -100 except on the answer word and `</s>`); pixels: (B, F, 3,
    64, 64). find_queries: (B, 2) long (row, position of the naming word); find_targets: (2, B, T) bool, the vision
    tokens heads 0 and 1 of layer 0 should attend to from it; find_spread: (B,) bool, rows whose attention should be
    spread evenly over the targets (flash) rather than only lie on them; relay_queries: (B, 2) long, the position
    that predicts the answer; relay_targets: (B, T) bool, the naming word.
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


def prompt_text(processor, item: G.ClipItem) -> str:
    """The chat prompt of `item` as the `vtw` lmms-eval model writes it (`InputBuilder.prompt`: the video, then the
    text; generation prompt appended)."""
    content = [{"type": "video"}, {"type": "text", "text": item.prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip


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
    )  # fmt: skip


def masked_forward(model, batch: VideoBatch, withdraw_layer: torch.Tensor, layer_inputs: dict | None = None):
    """Hidden states after the decoder's final norm, (B, T, D), with simulated withdrawal: sample b's text tokens
    cannot attend to vision tokens in layers >= withdraw_layer[b] ((B,) long; L = never). The video tower runs
    without gradients (frozen in stage 2). layer_inputs: filled as in `vtw.synthvqa.train.masked_forward`."""
    decoder = model.model.language_model
    ids = batch.input_ids
    embeds = decoder.embed_tokens(ids)
    with torch.no_grad():
        hidden = model.model.video_tower(batch.pixels.flatten(0, 1), output_hidden_states=True).hidden_states
    features = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer]).flatten(0, 1)
    vision = ids == model.config.video_token_index  # (B, T)
    embeds = embeds.masked_scatter(vision[..., None].expand_as(embeds), features.to(embeds.dtype))
    return withdrawn_decoder_forward(decoder, embeds, vision, batch.attention_mask, withdraw_layer, layer_inputs)


def answer_loss(model, batch: VideoBatch, withdraw_layer: torch.Tensor, guide: bool = True):
    """(cross-entropy over the label tokens, (B,) bool first answer token right by argmax, guidance loss: the mean
    negative log attention mass of the find heads on their targets (spread rows: cross-entropy with the even
    spread) plus that of the relay head on the naming word; rows withdrawn at K <= 1 are left out)."""
    inputs: dict = {}
    hidden = masked_forward(model, batch, withdraw_layer, inputs if guide else None)
    targets = batch.labels[:, 1:]
    keep = targets != -100
    loss = nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), targets[keep])
    first = keep.float().argmax(dim=1)
    rows = torch.arange(targets.shape[0])
    correct = model.lm_head(hidden[rows, first]).argmax(-1) == targets[rows, first]
    guide_loss = torch.zeros(())
    usable = withdraw_layer > 1
    if guide and bool(usable.any()):
        layers = model.model.language_model.layers
        spread = batch.find_spread[usable]
        for head in (0, 1):
            probs = head_attention(layers[0], inputs[0], inputs["rotary"], inputs["mask"],
                                   batch.find_queries[usable], head)  # fmt: skip
            wanted = batch.find_targets[head][usable]
            mass = -torch.log((probs * wanted).sum(-1).clamp_min(1e-6))
            even = wanted.float() / wanted.float().sum(-1, keepdim=True)
            spread_loss = -(even * torch.log(probs.clamp_min(1e-6))).sum(-1)
            guide_loss = guide_loss + torch.where(spread, spread_loss, mass).mean()
        probs = head_attention(layers[1], inputs[1], inputs["rotary"], inputs["mask"], batch.relay_queries[usable])
        guide_loss = guide_loss - torch.log((probs * batch.relay_targets[usable]).sum(-1).clamp_min(1e-6)).mean()
    return loss, correct, guide_loss


@dataclass(frozen=True)
class VideoTrainReport:
    """Config, wall seconds (both stages), stage 1 shape accuracy, last loss, and the running first-token accuracy
    per question kind over the last 200 unwithdrawn train items."""

    config: VideoTrainConfig
    seconds: float
    vision_accuracy: float
    final_loss: float
    recent_accuracy: dict[str, float]


def train(config: VideoTrainConfig, progress: bool = True):
    """Train a fresh tiny Video-LLaVA; returns (model in eval mode, processor, VideoTrainReport)."""
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer()
    processor = build_processor("video_llava", tokenizer, VIDEO_CHAT_TEMPLATE, size=FRAME_SIZE, patch=PATCH)
    model = build_model(config, tokenizer)
    model.train()
    start = time.perf_counter()
    vision_accuracy = pretrain_vision(model, processor, config, progress) if config.vision_steps else float("nan")
    model.model.video_tower.requires_grad_(False)
    model.model.image_tower.requires_grad_(False)
    optimizer, trainable = stage_two_optimizer(model, config.lr, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    layers = config.text_layers
    recent: dict[str, list[bool]] = {kind: [] for kind in G.KINDS}
    loss_value = float("nan")
    bar = tqdm(range(config.steps), desc="stage 2: projector + decoder", unit="step", disable=not progress)
    for step in bar:
        items = [G.make_item("train", step * config.batch_size + j) for j in range(config.batch_size)]
        batch = make_batch(processor, items)
        draw = torch.rand(config.batch_size, generator=generator) < config.withdraw_prob
        drawn = torch.randint(0, layers, (config.batch_size,), generator=generator)
        withdraw_layer = torch.where(draw, drawn, torch.full_like(drawn, layers))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss, correct, guide_loss = answer_loss(model, batch, withdraw_layer, config.guide_weight > 0)
        optimizer.zero_grad(set_to_none=True)
        (loss + config.guide_weight * guide_loss).backward()
        nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        for item, ok, k in zip(items, correct.tolist(), withdraw_layer.tolist()):
            if k == layers:
                recent[item.kind] = (recent[item.kind] + [ok])[-200:]
        accs = {kind: float(np.mean(v)) if v else float("nan") for kind, v in recent.items()}
        bar.set_postfix(loss=f"{loss_value:.3f}", guide=f"{guide_loss.item():.3f}",
                        **{k[:3]: f"{a:.2f}" for k, a in accs.items()})  # fmt: skip
    model.eval()
    for tower in (model.model.video_tower, model.model.image_tower):
        tower.requires_grad_(True)
    report = VideoTrainReport(config, time.perf_counter() - start, vision_accuracy, loss_value, accs)
    return model, processor, report


def parse_args(argv: Sequence[str] | None = None) -> tuple[VideoTrainConfig, Path, int]:
    """CLI -> (VideoTrainConfig, output directory, torch thread count)."""
    defaults = VideoTrainConfig()
    parser = training_arguments("python -m vtw.synthvideo.train", __doc__, defaults, ASSET_DIR)
    args = parser.parse_args(argv)
    if args.threads <= 0:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    config = VideoTrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, vision_steps=args.vision_steps, seed=args.seed,
        withdraw_prob=args.withdraw_prob, guide_weight=args.guide_weight,
        warmup_steps=min(defaults.warmup_steps, args.steps - 1),
    )  # fmt: skip
    return config, args.output, args.threads


def main(argv: Sequence[str] | None = None) -> VideoTrainReport:
    config, output, threads = parse_args(argv)
    torch.set_num_threads(threads)
    model, processor, report = train(config)
    save_checkpoint(model, processor, output)
    accs = ", ".join(f"{k} {a:.3f}" for k, a in report.recent_accuracy.items())
    print(f"saved {output} after {report.seconds:.0f} s; stage 1 shape accuracy {report.vision_accuracy:.3f}; "
          f"loss {report.final_loss:.4f}; running first-token accuracy (last 200 per kind): {accs}")  # fmt: skip
    print(f"config: {dataclasses.asdict(config)}")
    return report


if __name__ == "__main__":
    main()
