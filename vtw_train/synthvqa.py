"""Train the embedded tiny LLaVA on the synthetic train split and save it (``python -m vtw_train synthvqa``).

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

The generic half (both stages' loops, schedule, optimizers, simulated withdrawal, losses, atomic save) is
:mod:`vtw_train.core`; this module is the synthvqa task: its config, stage 1 labels, batches and guidance rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

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
from vtw.synthvqa.model import (
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
    TinyLlavaSpec,
    build_model,
    build_processor,
    conversation_text,
)
from vtw_train import core

ASSETS = Path(__file__).resolve().parent.parent / "vtw" / "assets"
DEFAULT_OUTPUT = ASSETS / "tiny-llava"
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


@dataclass(frozen=True)
class TrainConfig(core.TrainConfig):
    """Every hyper-parameter of a run (the run is a function of this and the thread count): :class:`core.TrainConfig`'s,
    stage 1's batch size, the follow-up questions per image, the guided layers and the model's sizes."""

    vision_batch_size: int = 64
    follow_ups: int = 5
    guide_layers: tuple[int, int] = (0, 1)
    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)

    @property
    def decoder_layers(self) -> int:
        return self.spec.text_layers

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_withdraw_min_layer()
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


def pixel_values(processor: LlavaProcessor, images: Sequence) -> torch.Tensor:
    """(B, 3, H, W) CLIP-normalised pixels for `IMAGE_SIZE` square RGB images.

    Equal to what `processor.image_processor` returns for such images (their resize and crop are identities), at a
    fraction of the cost; other sizes are rejected.
    """
    for image in images:
        if image.size != (IMAGE_SIZE, IMAGE_SIZE) or image.mode != "RGB":
            raise ValueError(f"expected RGB {IMAGE_SIZE}x{IMAGE_SIZE} images, got {image.mode} {image.size}")
    return core.normalized_pixels(np.stack([np.asarray(image) for image in images]), 1, processor.image_processor)


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

    def step_loss(step: int):
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
        return loss, lambda: float(torch.stack(correct).mean())

    return core.pretrain_vision(params, step_loss, config, "stage 1: vision tower + projector", progress)


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


def masked_forward(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    withdraw_layer: torch.Tensor,
    layer_inputs: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hidden states after the decoder's final norm, (B, T, D), with simulated withdrawal
    (:func:`core.withdrawn_decoder_forward`: sample b's text tokens cannot attend to vision tokens in layers >=
    withdraw_layer[b], L = never; `layer_inputs` filled as there)."""
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
    return core.withdrawn_decoder_forward(decoder, embeds, vision, batch.attention_mask, withdraw_layer, layer_inputs)


def answer_loss(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    withdraw_layer: torch.Tensor,
    guide: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over label tokens, (B,) bool: first answer token predicted correctly by argmax, guidance
    loss), by :func:`core.supervised_losses`.

    guide: (find layer, relay layer) or None. The guidance loss is the mean negative log of the attention mass that
    head 0 of the find layer puts, from each naming word, on the named object's vision tokens (for counting rows:
    the cross-entropy with an even spread over the objects' centre tokens and `<s>`), plus that of the mass head 0
    of the relay layer puts, from the answer position, on the naming word. Rows whose withdrawal layer is <= the relay
    layer are left out (0 when `guide` is None or no row is left).
    """
    inputs: dict = {}
    hidden = masked_forward(model, batch, withdraw_layer, inputs if guide else None)
    if guide is None:
        return core.supervised_losses(model, hidden, batch.labels, withdraw_layer, inputs)
    find, relay = guide
    finds = [(find, 0, batch.find_queries, batch.find_targets, batch.find_spread)]
    relay_rows = (relay, batch.relay_queries, batch.relay_targets)
    return core.supervised_losses(model, hidden, batch.labels, withdraw_layer, inputs, finds, relay_rows)


class SynthVQATask(core.Task):
    """The synthvqa task for :func:`core.train` (running accuracy: the last 100 steps' first answer tokens)."""

    name = "tiny-llava"

    def __init__(self) -> None:
        self.recent: list[float] = []

    def build(self, config: TrainConfig):
        processor = build_processor()
        return build_model(config.spec, processor.tokenizer, seed=config.seed), processor

    def frozen_towers(self, model):
        return [model.model.vision_tower]

    def pretrain_vision(self, model, processor, config, progress):
        return pretrain_vision(model, processor, config, progress)

    def batch(self, processor, config, step):
        items = [make_item("train", step * config.batch_size + j) for j in range(config.batch_size)]
        return make_batch(processor, items, config.follow_ups)

    def loss(self, model, batch, withdraw_layer, config):
        guide = config.guide_layers if config.guide_weight > 0 else None
        return answer_loss(model, batch, withdraw_layer, guide)

    def track(self, batch, correct, withdraw_layer, config):
        self.recent = (self.recent + [float(correct.float().mean())])[-100:]
        self.accuracy = sum(self.recent) / len(self.recent)
        return {"acc": f"{self.accuracy:.3f}"}


def train(
    config: TrainConfig, progress: bool = True
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, core.TrainReport]:
    """Train a fresh tiny LLaVA with `config`; returns the model (eval mode), its processor and a report."""
    return core.train(SynthVQATask(), config, progress)


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, Path, int]:
    """CLI -> (TrainConfig, output directory, torch thread count)."""
    defaults = TrainConfig()
    parser = core.training_arguments("python -m vtw_train synthvqa", __doc__, defaults, DEFAULT_OUTPUT)
    parser.add_argument(
        "--plain",
        action="store_true",
        help=f"train like an ordinary MLLM: no withdrawal curriculum (withdraw_prob 0), default --output {PLAIN_OUTPUT}",
    )
    parser.set_defaults(output=None, withdraw_prob=None)
    args = parser.parse_args(argv)
    if args.plain and args.withdraw_prob not in (None, 0.0):
        raise ValueError(f"--plain trains without the withdrawal curriculum, got --withdraw-prob {args.withdraw_prob}")
    if args.withdraw_prob is None:
        args.withdraw_prob = 0.0 if args.plain else defaults.withdraw_prob
    output = args.output or (PLAIN_OUTPUT if args.plain else DEFAULT_OUTPUT)
    return TrainConfig(**core.schedule_arguments(args, defaults)), output, args.threads


def main(argv: Sequence[str] | None = None) -> core.TrainReport:
    config, output, threads = parse_args(argv)
    return core.run(SynthVQATask(), config, output, threads)


if __name__ == "__main__":
    main()
