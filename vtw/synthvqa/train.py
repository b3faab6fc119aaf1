"""Train the embedded tiny LLaVA on the synthetic train split and save it (``python -m vtw.synthvqa.train``).

The run is deterministic for a given seed and thread count: fixed torch seed, train items drawn in order from the
train split (`generator.make_item("train", i)`; every item is seen once, so the running accuracy in the progress bar
is measured on items the model has not trained on yet), a fixed learning-rate schedule. The loss covers the answer
tokens and the closing `</s>` only. On a 2-core CPU the default run takes about ten minutes.

Withdrawal-aware curriculum (`--withdraw-prob`, `--withdraw-min-layer`): with probability `withdraw_prob` a training
sample is run as if VTW withdrew the vision tokens before a layer K drawn uniformly from
`withdraw_min_layer .. L-1`; in layers >= K its text tokens cannot attend to vision tokens (for the text tokens this
is exactly what withdrawal computes, with positions kept). The loss then asks for the right answer anyway, so the
decoder learns to move what it needs from the image into the text tokens within its first `withdraw_min_layer`
layers, the "information migration" the VTW paper observes in LLaVA-1.5. Why the shipped checkpoint uses it, and
what the curve looks like without it, is written in `vtw/assets/tiny-llava/README.md`.

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

from vtw.synthvqa.generator import CELL, COLORS, IMAGE_SIZE, SHAPES, Scene, SynthItem, follow_up_turns, make_item
from vtw.synthvqa.model import NUM_IMAGE_TOKENS, PATCH_SIZE, TinyLlavaSpec, build_model, build_processor

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava"
VISION_ITEM_OFFSET = 500_000_000
"""Stage 1 draws its scenes from train items `VISION_ITEM_OFFSET + i` (still the train split, unused by stage 2)."""
PATCH_TARGETS: dict[str, int] = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "size": 4, "centre": 2}
"""Stage 1 labels per patch and their class counts (class 0 = background / no)."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all of them; the run is a function of this and the thread count)."""

    steps: int = 1200
    batch_size: int = 32
    vision_steps: int = 400
    vision_batch_size: int = 64
    vision_lr: float = 3e-3
    follow_ups: int = 3
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    withdraw_prob: float = 0.0
    withdraw_min_layer: int = 2
    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {value!r}")
        if not 0.0 <= self.withdraw_prob <= 1.0:
            raise ValueError(f"TrainConfig.withdraw_prob must be in [0, 1], got {self.withdraw_prob!r}")
        if not 0 <= self.withdraw_min_layer < self.spec.text_layers:
            raise ValueError(
                f"TrainConfig.withdraw_min_layer must be in [0, {self.spec.text_layers - 1}], "
                f"got {self.withdraw_min_layer!r}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps), got {self.warmup_steps!r}")


@dataclass(frozen=True)
class Batch:
    """A training batch (right-padded).

    input_ids, attention_mask, labels: (B, T) — labels are -100 except on the answer tokens and `</s>`.
    pixel_values: (B, 3, IMAGE_SIZE, IMAGE_SIZE) float32.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor


@dataclass(frozen=True)
class TrainReport:
    """What a run did: its config, wall time, and the running accuracy of the last 100 steps (first answer token)."""

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


def patch_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Per-patch labels of a scene, each (NUM_IMAGE_TOKENS,) int64 in row-major patch order.

    A patch belongs to the object covering most of its pixels if that object covers at least 15% of it, else to the
    background (class 0). color: 1 + index in COLORS; shape: 1 + index in SHAPES; size: the object's side in
    grid cells (1..3); centre: 1 if the object's centre pixel lies in the patch.
    """
    grid = IMAGE_SIZE // PATCH_SIZE
    ids = np.asarray(scene.object_map()).reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).transpose(0, 2, 1, 3)
    ids = ids.reshape(grid * grid, PATCH_SIZE * PATCH_SIZE)
    counts = np.stack([(ids == k).sum(axis=1) for k in range(len(scene.objects) + 1)], axis=1)  # (P, 1 + n)
    owner = counts[:, 1:].argmax(axis=1) + 1
    owner[counts[:, 1:].max(axis=1) < 0.15 * PATCH_SIZE * PATCH_SIZE] = 0
    color_index = {name: i for i, name in enumerate(COLORS)}
    table = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)
    for k, obj in enumerate(scene.objects, start=1):
        table[k] = (1 + color_index[obj.color], 1 + SHAPES.index(obj.shape), (obj.size + CELL - 1) // CELL)
    centre = np.zeros(grid * grid, dtype=np.int64)
    for obj in scene.objects:
        centre[(obj.cy // PATCH_SIZE) * grid + obj.cx // PATCH_SIZE] = 1
    return {"color": table[owner, 0], "shape": table[owner, 1], "size": table[owner, 2], "centre": centre}


def pretrain_vision(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, config: TrainConfig, progress: bool = True
) -> float:
    """Stage 1: train the vision tower and the projector to label every patch (`PATCH_TARGETS`).

    Linear heads read each projected vision token after a parameter-free RMSNorm, i.e. what the decoder's first
    `input_layernorm` will see (up to its gain), so the projected tokens come out well conditioned for the decoder;
    the heads are thrown away afterwards. Returns the mean foreground-patch accuracy of the last 20 steps.
    """
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    width = model.config.text_config.hidden_size
    norm = nn.RMSNorm(width, eps=model.config.text_config.rms_norm_eps, elementwise_affine=False)
    heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in PATCH_TARGETS.items()})
    params = [*tower.parameters(), *projector.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    schedule = TrainConfig(
        steps=config.vision_steps, lr=config.vision_lr, warmup_steps=min(20, config.vision_steps - 1)
    )
    recent: list[float] = []
    bar = tqdm(range(config.vision_steps), desc="stage 1: vision tower + projector", unit="step", disable=not progress)
    for step in bar:
        first = VISION_ITEM_OFFSET + step * config.vision_batch_size
        scenes = [make_item("train", first + j).scene for j in range(config.vision_batch_size)]
        pixels = pixel_values(processor, [scene.render() for scene in scenes])
        targets = [patch_targets(scene) for scene in scenes]
        hidden = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        tokens = norm(projector(hidden))  # (B, P, D)
        loss = torch.zeros(())
        correct = []
        for name, head in heads.items():
            target = torch.from_numpy(np.stack([t[name] for t in targets]))  # (B, P)
            logits = head(tokens)  # (B, P, classes)
            loss = loss + nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
            foreground = target > 0 if name != "centre" else torch.ones_like(target, dtype=torch.bool)
            correct.append((logits.argmax(-1) == target)[foreground].float().mean())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        recent = (recent + [float(torch.stack(correct).mean())])[-20:]
        bar.set_postfix(loss=f"{float(loss):.3f}", patch_acc=f"{sum(recent) / len(recent):.3f}")
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
    same image, see `generator.follow_up_turns`), right-pad, and mark every answer (+ `</s>`) as labels."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    rows, label_rows = [], []
    for item in items:
        turns = [(item.prompt, item.answer), *follow_up_turns(item, follow_ups)]
        ids = expand_image_tokens(tokenizer(conversation_text(tokenizer, turns))["input_ids"], image_id)
        rows.append(ids)
        label_rows.append(answer_labels(ids, tokenizer))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return Batch(input_ids, attention_mask, labels, pixel_values(processor, [it.image() for it in items]))


def masked_forward(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    withdraw_layer: torch.Tensor,
) -> torch.Tensor:
    """Hidden states after the decoder's final norm, (B, T, D), with simulated withdrawal.

    withdraw_layer: (B,) long; sample b's text tokens cannot attend to vision tokens in layers >= withdraw_layer[b]
    (L means never). For text positions this equals VTW with kept positions; vision positions are computed but
    are irrelevant to the loss. With every entry equal to L it matches `model(...)` (up to float rounding).
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

    batch_size, length = ids.shape
    positions = torch.arange(length, device=ids.device)[None].expand(batch_size, -1)
    rotary = decoder.rotary_emb(embeds, positions)
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    full = causal[None] & batch.attention_mask.bool()[:, None, :]  # (B, T_q, T_k)
    withdrawn = full & ~((~vision)[:, :, None] & vision[:, None, :])
    hidden = embeds
    for index, layer in enumerate(decoder.layers):
        use_withdrawn = (withdraw_layer <= index)[:, None, None]
        mask = torch.where(use_withdrawn, withdrawn, full)[:, None]  # (B, 1, T, T)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
    return decoder.norm(hidden)


def answer_loss(
    model: LlavaForConditionalGeneration, batch: Batch, withdraw_layer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over label tokens, (B,) bool: first answer token predicted correctly by argmax)."""
    hidden = masked_forward(model, batch, withdraw_layer)
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V): only the positions that predict a label
    loss = nn.functional.cross_entropy(logits, targets[keep])
    first = keep.float().argmax(dim=1)  # index of each row's first label (rows always have one)
    rows = torch.arange(targets.shape[0])
    first_logits = model.lm_head(hidden[rows, first])
    correct = first_logits.argmax(-1) == targets[rows, first]
    return loss, correct


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


def train(
    config: TrainConfig, progress: bool = True
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, TrainReport]:
    """Train a fresh tiny LLaVA with `config`; returns the model (eval mode), its processor and a report."""
    torch.manual_seed(config.seed)
    processor = build_processor()
    model = build_model(config.spec, processor.tokenizer, seed=config.seed)
    model.train()
    if config.vision_steps:
        pretrain_vision(model, processor, config, progress)
    model.model.vision_tower.requires_grad_(False)  # stage 2 keeps the vision tower frozen, as LLaVA does
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    generator = torch.Generator().manual_seed(config.seed)
    recent: list[float] = []
    start = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(range(config.steps), desc="train tiny-llava", unit="step", disable=not progress)
    for step in bar:
        items = [make_item("train", step * config.batch_size + j) for j in range(config.batch_size)]
        batch = make_batch(processor, items, config.follow_ups)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss, correct = answer_loss(model, batch, sample_withdraw_layers(config, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
        optimizer.step()
        loss_value = float(loss)
        recent = (recent + [float(correct.float().mean())])[-100:]
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{sum(recent) / len(recent):.3f}")
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


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, Path, int]:
    """CLI -> (TrainConfig, output directory, torch thread count)."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m vtw.synthvqa.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint directory (replaced)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--withdraw-prob", type=float, default=defaults.withdraw_prob)
    parser.add_argument("--withdraw-min-layer", type=int, default=defaults.withdraw_min_layer)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it slightly)")
    args = parser.parse_args(argv)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_steps=args.vision_steps,
        seed=args.seed,
        withdraw_prob=args.withdraw_prob,
        withdraw_min_layer=args.withdraw_min_layer,
        warmup_steps=min(defaults.warmup_steps, args.steps - 1),
    )
    if args.threads <= 0:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return config, args.output, args.threads


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
