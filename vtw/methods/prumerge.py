"""PruMerge / PruMerge+: per image (per video frame, per crop), the patches the vision tower's class token attends to
far more than to the others (IQR outliers: an adaptive count), each enriched with its key-nearest patches, plus one
token for what was pruned; PruMerge+ adds spatially uniform samples. In the vision encoder: on the features the
projector receives, so the projector runs on the kept tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .attention import class_token_attention_flops
from .base import check_int
from .ranking import KeepShare, check_keep, kept_count
from .towers import InTower, UnitChoice, feature_layer_module, tower_units

#: the papers' average share of LLaVA-1.5's 576 patches kept: PruMerge 32 (5.5 %), PruMerge+ 144 (25 %); the expected
#: count of a unit without a cap (``keep=None``)
NOMINAL_SHARE = {False: 32 / 576, True: 144 / 576}


@dataclass(frozen=True)
class PruMerge(KeepShare, InTower):
    """Per tower input (image, video frame, LLaVA-NeXT crop) of ``n`` patches, from the class token's attention
    ``a`` (softmax over all the input's tokens, mean over heads) and the keys ``k`` (``k_proj`` output, all heads:
    ``D`` wide) in the tower layer that *receives* the features the projector reads (``hidden_states[-2]`` for
    LLaVA's ``vision_feature_layer=-2``: the last layer, as the reference's ``layers[23]`` of CLIP-L's 24):

    1. outliers: the patches whose ``a`` is above ``Q3 + 1.5 · IQR`` of the ``n`` scores (quartiles by linear
       interpolation, numpy's default): an adaptive count ``m``;
    2. ``plus`` (PruMerge+): also every ``s``-th patch in grid order from the first, ``s = max(1, (n // max(m, 1)) //
       3)`` (the reference's ``int(int(1 / ratio) / 3)`` with ``ratio = m / n``), those not already kept;
    3. merge, on the features ``x`` the projector receives (``hidden_states[vision_feature_layer]``): each kept patch
       ``i`` becomes ``x_i + Σ_j a_j x_j`` over its ``neighbours`` nearest other patches (kept or not) by the cosine
       of the keys; the pruned patches become one more token ``Σ_j a_j x_j`` (attention weights as they are, not
       normalised, as the reference does), placed after the unit's last cell (its position). Only these tokens go
       through the projector (:class:`~vtw.methods.towers.InTower`): its FLOPs follow the realized count.

    ``keep`` (the free parameter of ``vtw.budget``): a cap, at most ``ceil(keep · n)`` tokens per unit, the pruned
    patches' token included: the outliers with the highest ``a`` come first; PruMerge+'s stride grows until the
    samples fit. Counts depend on the data; the declared (expected) count of a unit (:meth:`grid_tokens`: FLOPs,
    ``mode=flops``, ``vtw.budget``) is ``min(n, ceil(keep · n))``, an upper bound of the realized count
    (``handle.last_layer_tokens``); without a cap, the papers' average share (:data:`NOMINAL_SHARE`), not a bound.
    A unit that would keep ``n - 1`` patches or more stays whole and unchanged. ``keep=1`` keeps everything: nothing is
    installed (the full model, as ``keep=1`` of every method; ``vtw.budget=1``); ``keep=None``: no cap.

    Towers with a class token only: LLaVA-1.5, Video-LLaVA (images and video frames), LLaVA-NeXT(-Video) images, per
    crop (the base crop; each crop of the unpadded crop grid on the patches the unpadding left, the IQR over those);
    a crop grid loses its row newlines (as vtw's VisionZip). LLaVA-NeXT-Video's pooled video frames: an error.

    Deviations from the reference code (LLaVA-1.5 only, images only, batch of one):

    * each kept token stays at its own position (nothing renumbered; the reference orders the kept tokens by
      attention); the pruned patches' token takes the position of the unit's last cell.
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
        return () if self.keep == 1 else (0,)  # keep=1: no cap at all would still prune; it is the full model

    @property
    def label(self) -> str:
        out = "prumerge+" if self.plus else "prumerge"
        if self.keep is not None:
            out += f" keep={self.keep:.3g}"
        return out if self.neighbours == 32 else f"{out} neighbours={self.neighbours}"

    # ------------------------------------------------------------------ the model
    reads: ClassVar[str] = "counts and ranks patches by"

    def tower_layer(self, tower: nn.Module, feature_layer, display: str) -> nn.Module:
        return feature_layer_module(tower, feature_layer, display, self.name, receives=True)

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

    def reduce_unit(self, attention, keys, features) -> UnitChoice:
        """One unit of ``n`` patches: ``attention`` ``(n,)``, ``keys`` ``(n, D)``, ``features`` ``(n, Dv)`` (what the
        projector receives). The kept patches' merged features ``(k, Dv)`` and the pruned patches' token ``(Dv,)``
        (float32), or a whole unit."""
        kept = self.choose(attention)
        if kept is None:
            return UnitChoice(None)
        n = attention.numel()
        unit = nn.functional.normalize(keys.float(), dim=-1)
        similarity = torch.matmul(unit, unit.T)  # (n, n)
        similarity.fill_diagonal_(-torch.inf)  # a patch is not its own neighbour
        ranked = torch.sort(similarity[kept], dim=1, descending=True, stable=True).indices  # ties: earlier first
        near = ranked[:, : min(self.neighbours, n - 1)]
        a, x = attention.float(), features.float()
        merged = x[kept] + (a[near][..., None] * x[near]).sum(1)
        pruned = torch.ones(n, dtype=torch.bool, device=x.device)
        pruned[kept] = False
        return UnitChoice(kept, merged, (a[pruned][:, None] * x[pruned]).sum(0))


def outlier_count(scores: torch.Tensor) -> int:
    """How many of ``scores`` ``(n,)`` lie above ``Q3 + 1.5 · (Q3 - Q1)`` (quartiles by linear interpolation between
    the sorted values, numpy's default percentile; computed in float64)."""
    x = scores.detach().flatten().double()
    if x.numel() == 0:
        return 0
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    return int((x > q3 + 1.5 * (q3 - q1)).sum())
