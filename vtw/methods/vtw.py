"""VTW (arXiv 2405.05803): before layer ``K`` every vision token is withdrawn; layers ``K..L-1`` see text only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import OneLayer, StageContext


@dataclass(frozen=True)
class Withdrawal(OneLayer):
    """Visual Tokens Withdrawal before decoder layer ``layer`` (``K``).

    ``layer=None`` or ``layer=L``: no withdrawal (nothing is installed). ``layer=0``: the decoder never sees vision
    tokens (an ablation).
    """

    name = "vtw"
    free_parameter = "layer"

    def select(self, ctx: StageContext) -> torch.Tensor:
        return ~ctx.vision

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        return 0, text

    def budget_candidates(self, num_layers: int) -> list[Withdrawal]:
        return [Withdrawal(layer=k) for k in range(num_layers + 1)]

    @property
    def label(self) -> str:
        return "vtw" if self.layer is None else f"vtw K={self.layer}"
