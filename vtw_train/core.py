"""The task-independent half of training: the config fields every run has, the two-stage loop, the learning-rate
schedule, the optimizers, the simulated withdrawal, the losses and the atomic save.

A task (:mod:`vtw_train.synthvqa`, :mod:`vtw_train.synthvideo`) is a :class:`Task`: how to build a fresh model, its
stage 1 step, its train items, batches and stage 2 loss. :func:`train` runs both stages for any task:

1. stage 1 (:func:`pretrain_vision`): the vision tower and the projector, on the task's per-patch labels;
2. stage 2: the vision tower frozen, projector + decoder on the task's questions, with the withdrawal curriculum
   (:func:`sample_withdraw_layers`, :func:`withdrawn_decoder_forward`) and attention guidance
   (:func:`supervised_losses`).

Every run is a function of its config, the torch thread count and the machine; the order of every random draw, every op and every
gradient accumulation is part of that function (on the machine that trained a checkpoint, the same command
rebuilds it bit for bit: docs/embedded.md), so refactoring here has to keep both.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vtw.methods.attention import head_query_attention


@dataclass(frozen=True)
class TrainConfig:
    """The hyper-parameters every task has (a task's config adds its own and sets `decoder_layers`).

    steps, batch_size, lr, min_lr_ratio, warmup_steps: stage 2's schedule (:func:`learning_rate`); vision_steps,
    vision_lr: stage 1's (20 warm-up steps, same decay); weight_decay, grad_clip, seed: both stages'.
    withdraw_prob, withdraw_min_layer: the curriculum (:func:`sample_withdraw_layers`); guide_weight: the weight of the
    attention guidance loss (0 turns it off).
    """

    steps: int = 700
    batch_size: int = 32
    vision_steps: int = 350
    vision_lr: float = 3e-3
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    withdraw_prob: float = 0.25
    withdraw_min_layer: int = 0
    guide_weight: float = 1.0

    @property
    def decoder_layers(self) -> int:
        """L, the decoder's layer count (withdrawal layers are 0 .. L; L = never)."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in ("steps", "batch_size", "lr"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{name}.{field_name} must be > 0, got {getattr(self, field_name)!r}")
        if self.vision_steps < 0:
            raise ValueError(f"{name}.vision_steps must be >= 0, got {self.vision_steps!r}")
        if not 0.0 <= self.withdraw_prob <= 1.0:
            raise ValueError(f"{name}.withdraw_prob must be in [0, 1], got {self.withdraw_prob!r}")
        if self.guide_weight < 0:
            raise ValueError(f"{name}.guide_weight must be >= 0, got {self.guide_weight!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"{name}.warmup_steps must be in [0, steps), got {self.warmup_steps!r}")

    def check_withdraw_min_layer(self) -> None:
        """Called by a task's `__post_init__` once its `decoder_layers` can be read."""
        if not 0 <= self.withdraw_min_layer < self.decoder_layers:
            raise ValueError(
                f"{type(self).__name__}.withdraw_min_layer must be in [0, {self.decoder_layers - 1}], "
                f"got {self.withdraw_min_layer!r}"
            )


@dataclass(frozen=True)
class TrainReport:
    """What a run did: its config, wall seconds (both stages), stage 1's accuracy over its last 20 steps (nan without
    stage 1), stage 2's last loss, and stage 2's running first-token accuracy (the task's :meth:`Task.track`)."""

    config: TrainConfig
    seconds: float
    vision_accuracy: float
    final_loss: float
    recent_accuracy: float | dict[str, float]


class Task:
    """What :func:`train` needs from a task (each method gets the run's config): `build(config)` -> (fresh model from
    the global torch seed, already set; processor); `frozen_towers(model)`: the vision towers stage 2 freezes;
    `pretrain_vision(model, processor, config, progress)`: stage 1 (:func:`pretrain_vision` with the task's step),
    returns its accuracy; `batch(processor, config, step)`: stage 2's batch of `step` (train items in order: each is
    seen once); `loss(model, batch, withdraw_layer, config)`: (answer loss, (B,) bool first answer token right,
    guidance loss), :func:`supervised_losses`; `track(batch, correct, withdraw_layer, config)`: records a step's
    `correct`, sets `accuracy` and returns the progress bar's accuracy fields."""

    name = "task"
    accuracy: float | dict[str, float] = float("nan")


def learning_rate(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def pretrain_vision(
    params: list[nn.Parameter],
    step_loss: Callable[[int], tuple[torch.Tensor, Callable[[], float]]],
    config: TrainConfig,
    desc: str,
    progress: bool = True,
) -> float:
    """Stage 1's loop: AdamW over `params` (betas 0.9, 0.98) at `config.vision_lr`, 20 warm-up steps, then the
    cosine decay, `config.vision_steps` steps. `step_loss(step)` returns the step's loss and a function that reads the
    step's accuracy (called after the update). Returns the mean accuracy over the last 20 steps (nan: no steps)."""
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    warmup = min(20, config.vision_steps - 1)
    recent: list[float] = []
    bar = tqdm(range(config.vision_steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        loss, accuracy = step_loss(step)
        set_learning_rate(
            optimizer, learning_rate(step, config.vision_steps, config.vision_lr, warmup, config.min_lr_ratio)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        recent = (recent + [accuracy()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(recent):.3f}")
    return float(np.mean(recent)) if recent else float("nan")


def stage_two_optimizer(model: nn.Module, lr: float, weight_decay: float):
    """(AdamW over the parameters that require grad, [(name, parameter)] of those): weight decay on matrices except
    embeddings, none on the rest; betas 0.9, 0.98."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    return optimizer, trainable


def sample_withdraw_layers(config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) long withdrawal layer per sample: L (none) or, with `withdraw_prob`, uniform in
    `withdraw_min_layer .. L-1` (two draws from `generator` per step, whatever `withdraw_prob` is)."""
    num_layers = config.decoder_layers
    draw = torch.rand(config.batch_size, generator=generator) < config.withdraw_prob
    layers = torch.randint(config.withdraw_min_layer, num_layers, (config.batch_size,), generator=generator)
    return torch.where(draw, layers, torch.full_like(layers, num_layers))


def train(task: Task, config: TrainConfig, progress: bool = True):
    """Train a fresh model of `task` with `config`: (model in eval mode, processor, :class:`TrainReport`)."""
    torch.manual_seed(config.seed)
    model, processor = task.build(config)
    model.train()
    start = time.perf_counter()
    vision_accuracy = task.pretrain_vision(model, processor, config, progress) if config.vision_steps else math.nan
    towers = task.frozen_towers(model)
    for tower in towers:  # stage 2 keeps the vision tower frozen, as LLaVA does
        tower.requires_grad_(False)
    optimizer, trainable = stage_two_optimizer(model, config.lr, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loss_value = float("nan")
    bar = tqdm(range(config.steps), desc=f"stage 2: train {task.name}", unit="step", disable=not progress)
    for step in bar:
        batch = task.batch(processor, config, step)
        withdraw_layer = sample_withdraw_layers(config, generator)
        set_learning_rate(
            optimizer, learning_rate(step, config.steps, config.lr, config.warmup_steps, config.min_lr_ratio)
        )
        loss, correct, guide_loss = task.loss(model, batch, withdraw_layer, config)
        optimizer.zero_grad(set_to_none=True)
        (loss + config.guide_weight * guide_loss).backward()
        nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        fields = task.track(batch, correct, withdraw_layer, config)
        bar.set_postfix(loss=f"{loss_value:.3f}", guide=f"{guide_loss.item():.3f}", **fields)
    model.eval()
    for tower in towers:
        tower.requires_grad_(True)
    report = TrainReport(config, time.perf_counter() - start, vision_accuracy, loss_value, task.accuracy)
    return model, processor, report


def normalized_pixels(pixels: np.ndarray, channels: int, processor_part) -> torch.Tensor:
    """uint8 RGB `pixels` with channels last -> float32 with channels at axis `channels`, CLIP-normalised with
    `processor_part.image_mean` / `image_std` (what the image or video processor returns where its resize and crop
    are identities, at a fraction of the cost)."""
    order = list(range(pixels.ndim - 1))
    order.insert(channels, pixels.ndim - 1)
    x = torch.from_numpy(pixels).permute(*order).float() / 255.0
    shape = [1] * pixels.ndim
    shape[channels] = -1
    mean = torch.tensor(processor_part.image_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(processor_part.image_std, dtype=torch.float32).view(shape)
    return (x - mean) / std


def withdrawn_decoder_forward(
    decoder: nn.Module,
    embeds: torch.Tensor,
    vision: torch.Tensor,
    attention_mask: torch.Tensor,
    withdraw_layer: torch.Tensor,
    layer_inputs: dict | None = None,
) -> torch.Tensor:
    """Hidden states after a Llama decoder's final norm, (B, T, D), with simulated withdrawal, per sample.

    embeds: (B, T, D) with the vision positions `vision` (B, T) bool already filled in; attention_mask (B, T);
    withdraw_layer: (B,) long: sample b's text tokens cannot attend to vision tokens in layers >= withdraw_layer[b]
    (L means never). For text positions this is what VTW computes with kept positions (`vtw.withdraw`,
    ``positions="keep"``); vision positions are computed on but are irrelevant to the loss. With every entry equal to L
    it matches the model's own forward (up to float rounding). layer_inputs: if given, filled with {layer index: its
    input hidden states (B, T, D)} and, under "mask" and "rotary", the full (no withdrawal) (B, T, T) bool mask and
    the (cos, sin) rotary tables.

    Why a mask and not `vtw.withdraw`: the curriculum withdraws each sample of a batch before its own layer (or not
    at all), in one forward pass that autograd differentiates. `vtw.withdraw` removes the vision tokens from the
    whole batch at one layer (it physically drops them from the hidden states and the KV cache): a batch would have
    to be split by layer and run in up to L + 1 pieces, changing every matmul's shape, so neither the numbers nor the
    shipped checkpoints (trained with this mask) would be reproduced. The tests check that both agree on the text
    tokens (tests/test_embedded_model.py, tests/test_synthvideo_train.py).
    """
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


def head_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    queries: torch.Tensor,
    head: int = 0,
) -> torch.Tensor:
    """Attention probabilities of one head of a Llama decoder layer for a few query positions, differentiable.

    hidden: (B, T, D) the layer's input; rotary: (cos, sin), each (B, T, head_dim); mask: (B, T, T) bool, True = may
    attend; queries: (N, 2) long (row, position). Returns (N, T): what `layer.self_attn` computes for those queries in
    head `head`, by `vtw.methods.attention.head_query_attention`. Keys are projected per query row (a sample with
    several queries is projected several times): cheaper once per sample, but that sums the gradients in another
    order and no longer reproduces the shipped checkpoints' bits.
    """
    rows, positions = queries[:, 0], queries[:, 1]
    rotary_rows = (rotary[0][rows], rotary[1][rows])
    return head_query_attention(layer, hidden[rows], rotary_rows, mask[rows, positions], positions, head)


def supervised_losses(
    model: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    withdraw_layer: torch.Tensor,
    inputs: dict,
    finds: Sequence[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = (),
    relay: tuple[int, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the label tokens, (B,) bool: first answer token predicted right by argmax, guidance
    loss) of the hidden states `hidden` (B, T, D) after the final norm; labels (B, T), -100 where not scored.

    Guidance (0 without `relay`): `finds` are (layer, head, queries (N, 2), targets (N, T) bool, spread (N,) bool):
    each adds the mean over rows of the negative log attention mass that head puts from its query on its targets (for
    `spread` rows: the cross-entropy with an even spread over the targets); `relay` (layer, queries, targets) adds the
    negative log mass head 0 of that layer puts from its query on its target. `inputs`: the layer inputs, mask and
    rotary tables of :func:`withdrawn_decoder_forward`. Query rows whose sample is withdrawn before or at the relay
    layer are left out (their text cannot read the image there).
    """
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V): only the positions that predict a label
    loss = nn.functional.cross_entropy(logits, targets[keep])
    first = keep.float().argmax(dim=1)  # index of each row's first label (rows always have one)
    rows = torch.arange(targets.shape[0])
    correct = model.lm_head(hidden[rows, first]).argmax(-1) == targets[rows, first]
    guide_loss = torch.zeros(())
    if relay is None:
        return loss, correct, guide_loss
    relay_layer, relay_queries, relay_targets = relay
    usable = withdraw_layer[relay_queries[:, 0]] > relay_layer  # (N,)
    if not bool(usable.any()):
        return loss, correct, guide_loss
    layers = model.model.language_model.layers

    def attention(layer: int, queries: torch.Tensor, head: int = 0) -> torch.Tensor:
        return head_attention(layers[layer], inputs[layer], inputs["rotary"], inputs["mask"], queries[usable], head)

    for layer, head, queries, wanted, spread in finds:
        probs, wanted = attention(layer, queries, head), wanted[usable]
        mass = -torch.log((probs * wanted).sum(dim=-1).clamp_min(1e-6))  # (N,) mass on the targets
        even = wanted.float() / wanted.float().sum(dim=-1, keepdim=True)  # spread rows: evenly over the targets
        spread_loss = -(even * torch.log(probs.clamp_min(1e-6))).sum(dim=-1)
        guide_loss = guide_loss + torch.where(spread[usable], spread_loss, mass).mean()
    probs = attention(relay_layer, relay_queries)
    relay_loss = -torch.log((probs * relay_targets[usable]).sum(dim=-1).clamp_min(1e-6))
    return loss, correct, guide_loss + relay_loss.mean()


def save_checkpoint(model: nn.Module, processor, output: Path) -> None:
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


def training_arguments(prog: str, doc: str, defaults: TrainConfig, output: Path) -> argparse.ArgumentParser:
    """The CLI options every task has, with `defaults`' values and `output` as the default checkpoint directory."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=output, help="checkpoint directory (replaced)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--withdraw-prob", type=float, default=defaults.withdraw_prob)
    parser.add_argument("--withdraw-min-layer", type=int, default=defaults.withdraw_min_layer)
    parser.add_argument("--guide-weight", type=float, default=defaults.guide_weight, help="0 turns guidance off")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it slightly)")
    return parser


def schedule_arguments(args: argparse.Namespace, defaults: TrainConfig) -> dict:
    """The config fields of :func:`training_arguments`' options (warm-up shortened to fit `--steps`); rejects
    ``--threads`` < 1."""
    if args.threads <= 0:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_steps=args.vision_steps,
        seed=args.seed,
        withdraw_prob=args.withdraw_prob,
        withdraw_min_layer=args.withdraw_min_layer,
        guide_weight=args.guide_weight,
        warmup_steps=min(defaults.warmup_steps, args.steps - 1),
    )


def run(task: Task, config: TrainConfig, output: Path, threads: int) -> TrainReport:
    """Train with `threads` torch threads, save to `output`, print a summary."""
    torch.set_num_threads(threads)
    model, processor, report = train(task, config)
    save_checkpoint(model, processor, output)
    accuracy = report.recent_accuracy
    if isinstance(accuracy, dict):
        accuracy = ", ".join(f"{k} {a:.3f}" for k, a in accuracy.items())
    else:
        accuracy = f"{accuracy:.3f}"
    print(f"saved {output} after {report.seconds:.0f} s; stage 1 accuracy {report.vision_accuracy:.3f}; "
          f"loss {report.final_loss:.4f}; running first-token accuracy {accuracy}")  # fmt: skip
    print(f"config: {config}")
    return report
