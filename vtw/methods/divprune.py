"""DivPrune: per image (per video frame), the most diverse share of the projected vision tokens, chosen greedily by
max-min cosine distance, before the decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BeforeDecoder, StageContext
from .ranking import KeepShare, check_keep, kept_count


@dataclass(frozen=True)
class DivPrune(KeepShare, BeforeDecoder):
    """Keep ``ceil(keep · n)`` of the ``n`` grid cells of each image and each video frame: the subset a greedy
    max-min diversity search picks on the cosine distance ``1 - cos(x_i, x_j)`` between the projected tokens (the
    decoder's inputs). The first pick is the token whose nearest other token is farthest; each next pick is the
    token, not yet picked, farthest from its nearest picked token; ties go to the earliest cell. The kept tokens keep
    their order and their positions (nothing is renumbered), as every vtw method keeps positions; nothing is merged.

    One selection per grid frame of :mod:`vtw.grids`: a fixed-resolution image, an anyres image's base crop and its
    unpadded crop grid (each as one set, not per crop), a Qwen ``t`` slice, a video frame. Class tokens and trailing
    newlines stay (as ``pool`` keeps them); the row newlines of a grid that loses cells are dropped: the selection
    has no rows left to end. No attention is read, so it acts on every family.

    Differences from the reference (LLaVA only, images only), which selects from all of one image's tokens at once
    and keeps ``round(ratio · n)`` of them: there an anyres image's base crop, crop grid and newline tokens are one
    set (its newline tokens all carry one learned embedding, so at most one of them survives the max-min search);
    here each grid is its own set and the count is ``ceil(keep · n)`` per grid, known from the layout alone. The
    reference's first pick ranks each token by the second smallest distance of its column, its own (about 0) being
    the smallest; here the own distance is excluded, and a picked token is never picked again (the reference's
    argmax could pick one again once every token left duplicates a picked one). Its default ratio is 0.098.

    ``keep=1`` keeps everything, so nothing is installed. The distances are computed in float32, one ``n x n``
    matrix per grid frame on that sample's tokens alone, so a sample's choice never depends on its batch.
    """

    name = "divprune"
    free_parameter = "keep"
    keep: float = 0.098

    def __post_init__(self):
        object.__setattr__(self, "keep", check_keep(self.keep, "divprune keep"))

    def stages(self) -> tuple[int, ...]:
        return () if self.keep == 1 else (0,)

    @property
    def label(self) -> str:
        return f"divprune keep={self.keep:.3g}"

    def _reduces(self, grid) -> bool:
        """Whether a frame of ``grid`` loses cells (``ceil(keep · n) < n`` of its ``n = rows · cols``)."""
        n = grid.rows * grid.cols
        return kept_count(self.keep, n) < n

    def grid_tokens(self, grid) -> int:
        if not self._reduces(grid):
            return grid.tokens
        return grid.frames * (grid.lead + kept_count(self.keep, grid.rows * grid.cols)) + grid.trail

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """``2 · n² · D`` per grid frame that loses cells: the ``n x n`` cosine-similarity matmul of its ``n``
        projected tokens of ``D`` (the decoder's hidden size) features. The normalisation, ``1 - cos`` and the greedy
        search's minima and argmaxes are no matmuls and are not counted. ``tokens`` (per-layer counts) is not
        needed; ``layout`` is (``ValueError`` without it)."""
        if layout is None:
            raise ValueError(f"{self.label}: its scoring FLOPs depend on each image's grid; give the sample's layout")
        hidden = int(config.get_text_config().hidden_size)
        grids = [g for g in layout.grids if self._reduces(g)]
        return sum(g.frames * 2 * (g.rows * g.cols) ** 2 * hidden for g in grids)

    def select(self, ctx: StageContext) -> torch.Tensor:
        _, placed = self.placed_grids(ctx)
        keep = torch.ones_like(ctx.vision)  # text, class tokens, trailing newlines; cells and row newlines below
        for b, grids in enumerate(placed):
            for p in grids:
                if not self._reduces(p.grid):
                    continue
                cells = p.cells.to(ctx.hidden.device).flatten(1)  # (frames, n)
                count = kept_count(self.keep, cells.shape[1])
                distances = torch.stack([cosine_distances(ctx.hidden[b, frame]) for frame in cells])
                picked = max_min_diverse(distances, count)  # (frames, count)
                keep[b, cells.flatten()] = False
                keep[b, cells.gather(1, picked).flatten()] = True
                if p.newlines is not None:
                    keep[b, p.newlines.flatten().to(ctx.hidden.device)] = False
        return keep


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` float32 ``1 - cos`` between the rows of ``features`` ``(n, D)`` (one matmul: ``2 · n² · D``
    FLOPs)."""
    unit = nn.functional.normalize(features.float(), dim=-1)
    return 1 - unit @ unit.T


def max_min_diverse(distances: torch.Tensor, count: int) -> torch.Tensor:
    """The greedy max-min diverse subset of each of ``U`` token sets, from their distances ``(U, n, n)``.

    The first pick is the token whose nearest other token is farthest (``max_j min_{i != j} d[i, j]``); each next is
    the token not yet picked farthest from its nearest picked one (``max_j min_{p picked} d[p, j]``); ties go to the
    lowest index. No host synchronisation.

    Returns:
        ``(U, count)`` long, the picked indices of each set in ascending (original) order; ``1 <= count <= n``.
    """
    units, n, _ = distances.shape
    rows = torch.arange(units, device=distances.device)
    eye = torch.eye(n, dtype=torch.bool, device=distances.device)
    choice = distances.masked_fill(eye, torch.inf).amin(1).argmax(1)  # (U,): each column's nearest other token
    picks = [choice]
    picked = torch.zeros(units, n, dtype=torch.bool, device=distances.device)
    nearest = distances[rows, choice]  # (U, n): each token's distance to its nearest picked token
    for _ in range(count - 1):
        picked[rows, choice] = True
        choice = nearest.masked_fill(picked, -torch.inf).argmax(1)
        picks.append(choice)
        nearest = torch.minimum(nearest, distances[rows, choice])
    return torch.stack(picks, 1).sort(1).values
