"""Shared by the methods that keep a share of each sample's vision tokens: how many, and which of them by score."""

from __future__ import annotations

import math
from dataclasses import replace

import torch


def check_keep(keep, what: str = "keep") -> float:
    """A number in ``(0, 1]`` (the share of each sample's vision tokens kept), else ``ValueError`` naming it."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"{what} must be a number in (0, 1] (the share of vision tokens kept), got {keep!r}")
    return float(keep)


def kept_count(keep: float, vision: int) -> int:
    """``ceil(keep · V)`` of a sample's ``V`` vision tokens (computed so that ``keep · V`` integral is exact)."""
    return min(vision, math.ceil(round(keep * vision, 9)))


def keep_top_vision(scores: torch.Tensor, vision: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``(B, T)`` bool: every non-vision token, plus the ``counts[b]`` vision tokens of sample ``b`` with the highest
    ``scores`` (ties: the earlier position first).

    Args:
        scores: ``(B, T)``; vision: ``(B, T)`` bool; counts: vision tokens to keep per sample.
    """
    keep = ~vision
    ranked = torch.where(vision, scores.float(), torch.full_like(scores, -torch.inf, dtype=torch.float32))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    for b, n in enumerate(counts):
        if n:
            keep[b, order[b, :n]] = True
    return keep


#: the shares of vision tokens the matched-compute search tries (``vtw.budget``): 0.005 .. 1 in steps of 0.005
KEEP_GRID: tuple[float, ...] = tuple(i / 200 for i in range(1, 201))


class KeepShare:
    """Mixin of the methods whose free parameter is ``keep``, the share of the vision tokens kept: the grid the
    matched-compute search (``vtw.budget``) tries."""

    def budget_candidates(self, num_layers: int) -> list:
        """``keep`` of ``0.005 .. 1`` (steps of 0.005), least compute first; the other parameters as they are."""
        return [replace(self, keep=k) for k in KEEP_GRID]
