"""Random vision pruning: a seeded random subset of each sample's vision tokens from layer ``K`` on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Reduction, StageContext, check_int, check_layer
from .ranking import KeepShare, check_keep, keep_top_vision, kept_count


@dataclass(frozen=True)
class RandomVision(KeepShare, Reduction):
    """Keep ``ceil(keep · V_b)`` of sample ``b``'s vision tokens, drawn uniformly without replacement, and every text
    token. Each sample is drawn with its own CPU generator seeded ``seed``, so a batch draws what each sample alone
    draws. The baseline recent benchmarks use; unlike the paper's ``random`` ablation it never drops
    text. ``keep=1`` keeps everything, so nothing is installed."""

    name = "random_vision"
    free_parameter = "keep"
    layer: int = 2
    keep: float = 0.5
    seed: int = 0

    def __post_init__(self):  # the layer is checked by resolve(), against L
        object.__setattr__(self, "keep", check_keep(self.keep, "random_vision keep"))
        check_int(self.seed, "random_vision seed")

    def resolve(self, num_layers: int) -> RandomVision:
        if check_layer(self.layer, num_layers, "random_vision layer") is None:
            raise ValueError(f"random_vision layer must be an integer in [0, {num_layers}], got None")
        return self

    def stages(self) -> tuple[int, ...]:
        return () if self.keep == 1 else (self.layer,)

    def select(self, ctx: StageContext) -> torch.Tensor:
        scores = torch.zeros(ctx.vision.shape, dtype=torch.float32)
        for b in range(ctx.vision.shape[0]):
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            where = torch.nonzero(ctx.vision[b].cpu()).flatten()
            scores[b, where] = torch.rand(where.numel(), generator=g) + 1  # a random rank among its vision tokens
        counts = [kept_count(self.keep, int(n)) for n in ctx.vision.sum(1).tolist()]
        return keep_top_vision(scores.to(ctx.vision.device), ctx.vision, counts)

    @property
    def label(self) -> str:
        return f"random_vision K={self.layer} keep={self.keep:.3g} seed={self.seed}"

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        return kept_count(self.keep, vision), text
