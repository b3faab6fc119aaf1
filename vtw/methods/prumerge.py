"""PruMerge / PruMerge+: per image (per video frame, per crop), the patches the vision tower's class token attends to
far more than to the others (IQR outliers: an adaptive count), each enriched with its key-nearest patches, plus one
token for what was pruned; PruMerge+ adds spatially uniform samples. Before the decoder."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from .attention import class_token_attention, class_token_attention_flops
from .base import Extra, Merge, StageContext, check_int
from .ranking import KEEP_GRID, check_keep, kept_count
from .towers import ClassTokenTower, tower_units

#: the papers' average share of LLaVA-1.5's 576 patches kept: PruMerge 32 (5.5 %), PruMerge+ 144 (25 %); the expected
#: count of a unit without a cap (``keep=None``)
NOMINAL_SHARE = {False: 32 / 576, True: 144 / 576}


@dataclass(frozen=True)
class PruMerge(ClassTokenTower):
    """Per tower input (image, video frame, LLaVA-NeXT crop) of ``n`` patches, from the class token's attention
    ``a`` (softmax over all the input's tokens, mean over heads) and the keys ``k`` (``k_proj`` output, all heads:
    ``D`` wide) in the tower layer that *receives* the features the projector reads (``hidden_states[-2]`` for
    LLaVA's ``vision_feature_layer=-2``: the last layer, as the reference's ``layers[23]`` of CLIP-L's 24):

    1. outliers: the patches whose ``a`` is above ``Q3 + 1.5 · IQR`` of the ``n`` scores (quartiles by linear
       interpolation, numpy's default): an adaptive count ``m``;
    2. ``plus`` (PruMerge+): also every ``s``-th patch in grid order from the first, ``s = max(1, (n // max(m, 1)) //
       3)`` (the reference's ``int(int(1 / ratio) / 3)`` with ``ratio = m / n``), those not already kept;
    3. merge: each kept patch ``i`` becomes ``x_i + Σ_j a_j x_j`` over its ``neighbours`` nearest other patches (kept or
       not) by the cosine of the keys; the pruned patches become one more token ``Σ_j a_j x_j`` (attention weights as
       they are, not normalised, as the reference does), placed after the unit's last cell (its position).

    ``keep`` (the free parameter of ``vtw.budget``): a cap, at most ``ceil(keep · n)`` tokens per unit, the pruned
    patches' token included: the outliers with the highest ``a`` come first; PruMerge+'s stride grows until the
    samples fit. Counts depend on the data; the declared (expected) count of a unit (:meth:`grid_tokens`: FLOPs,
    ``mode=flops``, ``vtw.budget``) is ``min(n, ceil(keep · n))``, an upper bound of the realized count
    (``handle.last_layer_tokens``); without a cap, the papers' average share (:data:`NOMINAL_SHARE`), not a bound.
    A unit that would keep ``n - 1`` patches or more stays whole and unchanged.

    Towers with a class token only: LLaVA-1.5, Video-LLaVA (images and video frames), LLaVA-NeXT(-Video) images, per
    crop (the base crop; each crop of the unpadded crop grid on the patches the unpadding left, the IQR over those);
    a crop grid loses its row newlines (as vtw's VisionZip). LLaVA-NeXT-Video's pooled video frames: an error.

    Deviations from the reference code (LLaVA-1.5 only, images only, batch of one):

    * it merges CLIP features before the projector; vtw merges the projected features (the decoder's inputs), each
      kept token at its own position (nothing renumbered; the reference orders the kept tokens by attention); the
      pruned patches' token takes the position of the unit's last cell.
    * the attention: the reference takes one softmax of the full-width ``q · k`` (all heads concatenated, scale
      ``D^-1/2``); vtw the mean over heads of the per-head softmax (the tower's own attention weights).
    * counts in integer arithmetic (the reference's ``int(n · ratio)`` and ``int(1 / ratio)`` are exact for
      ``n = 576`` only); ``m = 0`` keeps no outlier (PruMerge+: stride of ``m = 1``; the reference fails); the
      uniform samples span the whole grid (the reference stops before patch 575); ``neighbours`` is capped at
      ``n - 1``; ties (nearest neighbours, the cap's order) go to the earlier patch in grid order.
    * ``vision_feature_layer=-1`` (no layer receives the last output): the last layer, the one that produces it.
    * the cosine similarities are computed for all ``n x n`` pairs (the cost follows the layout, not the data).
    """

    name = "prumerge"
    free_parameter = "keep"
    #: the realized token counts depend on the data (the outliers); :meth:`grid_tokens` gives the expected ones
    counts_depend_on_data: ClassVar[bool] = True
    plus: bool = False
    keep: float | None = None
    neighbours: int = 32

    def __post_init__(self):
        plus = self.plus
        if isinstance(plus, str) and plus.strip().lower() in ("true", "false"):
            plus = plus.strip().lower() == "true"  # model args give text
        if not isinstance(plus, bool):
            raise ValueError(f"prumerge plus must be true or false, got {self.plus!r}")
        object.__setattr__(self, "plus", plus)
        if self.keep is not None:
            object.__setattr__(self, "keep", check_keep(self.keep, "prumerge keep"))
        check_int(self.neighbours, "prumerge neighbours", minimum=1)

    def stages(self) -> tuple[int, ...]:
        return (0,)

    @property
    def label(self) -> str:
        out = "prumerge+" if self.plus else "prumerge"
        if self.keep is not None:
            out += f" keep={self.keep:.3g}"
        return out if self.neighbours == 32 else f"{out} neighbours={self.neighbours}"

    def budget_candidates(self, num_layers: int) -> list[PruMerge]:
        """Caps ``keep`` of ``0.005 .. 1`` (steps of 0.005), least compute first."""
        return [replace(self, keep=k) for k in KEEP_GRID]

    # ------------------------------------------------------------------ the model
    reads: ClassVar[str] = "counts and ranks patches by"

    def tower_layer(self, tower: nn.Module, feature_layer, display: str) -> nn.Module:
        return _scoring_layer(tower, feature_layer, display)

    def acts_on(self, model: nn.Module) -> bool:
        """True where a tower input has at least 2 patches (whether a unit shrinks depends on the image)."""
        return self.tower_patches(model) >= 2

    def expected_tokens(self, n: int) -> int:
        """Declared tokens of a unit of ``n`` patches: ``min(n, ceil(keep · n))``, or without a cap
        ``min(n, max(1, round(share · n)))`` with the papers' share (:data:`NOMINAL_SHARE`)."""
        if n < 2:
            return n
        if self.keep is not None:
            return kept_count(self.keep, n)
        return min(n, max(1, int(NOMINAL_SHARE[self.plus] * n + 0.5)))

    def grid_tokens(self, grid) -> int:
        sizes = [len(cells) for cells, _ in tower_units(grid)]
        if all(n < 2 for n in sizes):
            return grid.tokens
        return grid.frames * grid.lead + sum(self.expected_tokens(n) for n in sizes) + grid.trail

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """Per tower input of ``n >= 2`` patches: :func:`~vtw.methods.attention.class_token_attention_flops` of
        its ``side² + 1`` tokens and the ``n x n`` cosine similarities of its keys (``2 · n² · D``, ``D`` the tower's
        width). The merges are weighted sums (no matmul). Independent of the data, so ``tokens`` is not needed."""
        if layout is None:
            raise ValueError(f"{self.label}: its scoring FLOPs depend on each image's grid; give the sample's layout")
        vc = config.vision_config
        hidden = int(vc.hidden_size)
        length = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
        sizes = [len(cells) for grid in layout.grids for cells, _ in tower_units(grid)]
        return sum(class_token_attention_flops(hidden, length) + 2 * n * n * hidden for n in sizes if n >= 2)

    # ------------------------------------------------------------------ the choice
    def select(self, ctx: StageContext) -> Merge:
        layouts, placed = self.placed_grids(ctx)
        keep = torch.ones_like(ctx.vision)
        hidden = ctx.hidden.clone()
        units = self._tower_units(layouts, placed, keep)
        anchors: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(hidden.shape[0])]
        for kind, found in units.items():
            rows = [j for j, (_, cells, _) in enumerate(found) if len(cells) >= 2]
            if not rows:
                continue
            layer, seen = self.tower_inputs(ctx, kind, len(found))
            attention, keys = class_token_attention(layer, seen[rows].to(hidden.device), mean_keys=False)
            for row, j in enumerate(rows):
                b, cells, patch = found[j]
                token = 1 + patch.to(hidden.device)  # tower token 0 is the class token
                out = self.reduce_unit(attention[row, token], keys[row, token], ctx.hidden[b, cells])
                if out is None:
                    continue
                kept, merged, pruned = out
                keep[b, cells] = False
                keep[b, cells[kept]] = True
                hidden[b, cells[kept]] = merged.to(hidden.dtype)
                anchors[b].append((int(cells.max()), pruned))
        return Merge(keep, hidden, _extra(anchors, ctx))

    def _tower_units(self, layouts, placed, keep) -> dict[str, list]:
        """Every tower input of the prompt, in encoding order: ``kind -> [(sample, cells (n,) sequence positions,
        patches (n,) patch index in the tower input)]``; drops the row newlines of crop grids (in ``keep``)."""
        units = {"image": [], "video": []}
        for b, (layout, grids) in enumerate(zip(layouts, placed)):
            for i, p in enumerate(grids):
                kind = "image" if i < len(layout.images) else "video"
                cells = p.cells.flatten().to(keep.device)
                parts = tower_units(p.grid)
                units[kind].extend((b, cells[local], patch) for local, patch in parts)
                if p.newlines is not None and any(len(local) >= 2 for local, _ in parts):
                    keep[b, p.newlines.flatten().to(keep.device)] = False
        return units

    def choose(self, attention: torch.Tensor) -> torch.Tensor | None:
        """The patches one unit keeps: ``(k,)`` long indices into its ``n`` patches (outliers by attention, then
        PruMerge+'s samples in grid order), or ``None`` where the unit stays whole. ``attention``: ``(n,)``."""
        n = attention.numel()
        outliers = outlier_count(attention)
        room = n if self.keep is None else kept_count(self.keep, n) - 1  # patches besides the pruned ones' token
        order = torch.sort(attention.float(), descending=True, stable=True).indices
        chosen = order[: min(outliers, room)]
        if self.plus:
            taken = torch.zeros(n, dtype=torch.bool, device=attention.device)
            taken[chosen] = True
            stride = max(1, (n // max(outliers, 1)) // 3)
            while True:
                samples = torch.arange(0, n, stride, device=attention.device)
                samples = samples[~taken[samples]]
                if samples.numel() <= room - chosen.numel() or stride >= n:
                    break
                stride += 1
            chosen = torch.cat([chosen, samples[: max(room - chosen.numel(), 0)]])
        return None if chosen.numel() + 1 >= n else chosen

    def reduce_unit(self, attention, keys, values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One unit of ``n`` patches: ``attention`` ``(n,)``, ``keys`` ``(n, D)``, ``values`` ``(n, Dm)`` (the decoder
        inputs). Returns ``None`` (whole) or ``(kept (k,) indices, their merged values (k, Dm) float32, the pruned
        patches' token (Dm,) float32)``."""
        kept = self.choose(attention)
        if kept is None:
            return None
        n = attention.numel()
        unit = nn.functional.normalize(keys.float(), dim=-1)
        similarity = torch.matmul(unit, unit.T)  # (n, n)
        similarity.fill_diagonal_(-torch.inf)  # a patch is not its own neighbour
        ranked = torch.sort(similarity[kept], dim=1, descending=True, stable=True).indices  # ties: earlier first
        near = ranked[:, : min(self.neighbours, n - 1)]
        a, x = attention.float(), values.float()
        merged = x[kept] + (a[near][..., None] * x[near]).sum(1)
        pruned = torch.ones(n, dtype=torch.bool, device=x.device)
        pruned[kept] = False
        return kept, merged, (a[pruned][:, None] * x[pruned]).sum(0)


def outlier_count(scores: torch.Tensor) -> int:
    """How many of ``scores`` ``(n,)`` lie above ``Q3 + 1.5 · (Q3 - Q1)`` (quartiles by linear interpolation between
    the sorted values, numpy's default percentile; computed in float64)."""
    x = scores.detach().flatten().double()
    if x.numel() == 0:
        return 0
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    return int((x > q3 + 1.5 * (q3 - q1)).sum())


def _extra(anchors: list[list[tuple[int, torch.Tensor]]], ctx: StageContext) -> Extra | None:
    """The pruned patches' tokens: ``anchors[b]`` = ``[(column it follows, value (Dm,))]``; one whose column is not
    before the sample's query (last prompt) column is left out."""
    query = ctx.query_or_last().tolist()
    anchors = [[(c, v) for c, v in row if c < q] for row, q in zip(anchors, query)]
    slots = max(map(len, anchors))
    if not slots:
        return None
    batch, _, width = ctx.hidden.shape
    device = ctx.hidden.device
    hidden = torch.zeros(batch, slots, width, dtype=ctx.hidden.dtype, device=device)
    valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    after = torch.zeros(batch, slots, dtype=torch.long, device=device)
    for b, row in enumerate(anchors):
        for e, (column, value) in enumerate(row):
            hidden[b, e], valid[b, e], after[b, e] = value.to(hidden.dtype), True, column
    return Extra(hidden, valid, after)


def _scoring_layer(tower: nn.Module, feature_layer, display: str) -> nn.Module:
    """The encoder layer of a CLIP ``tower`` that receives ``hidden_states[feature_layer]`` (``hidden_states[0]`` is
    the embeddings, ``hidden_states[i]`` the output of layer ``i - 1``); the last layer where it is the last output."""
    layers = (getattr(tower, "encoder", None) or tower.vision_model.encoder).layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"prumerge needs one vision_feature_layer; {display}'s config has {feature_layer!r}")
    index = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if not 0 <= index <= len(layers):
        raise ValueError(
            f"prumerge: vision_feature_layer={feature_layer} of {display} selects no hidden state of its tower "
            f"(the tower has {len(layers)} layers)"
        )
    return layers[min(index, len(layers) - 1)]
