"""The paper's ablation: withdraw as many *random* tokens as the sample has vision tokens, before layer ``K``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import OneLayer, StageContext, check_int


@dataclass(frozen=True)
class RandomTokens(OneLayer):
    """Drop as many random non-padding tokens (vision or text; never the last) as the sample has vision tokens, at
    layer ``layer``. Seeded (``seed``), so runs repeat: each sample draws with its own CPU generator, over its own real
    tokens, so a left-padded batch gives each sample what it gets alone. Where a continuation is scored
    (``StageContext.query``), the draw is over the prompt (never its last token): the continuation is never dropped,
    and each continuation of a prompt sees what the prompt alone keeps."""

    name = "random"
    free_parameter = "layer"
    seed: int = 0

    def __post_init__(self):  # the layer is checked by resolve(), against L
        check_int(self.seed, "random seed")

    def select(self, ctx: StageContext) -> torch.Tensor:
        keep = torch.ones_like(ctx.vision)
        ends = ctx.query_or_last().tolist()  # the last prompt token (the last token unless a continuation follows)
        for b in range(ctx.vision.shape[0]):
            # The sample's own generator, over its own real prompt tokens before the last, in order (left padding only
            # shifts them), so a sample draws in a batch, or followed by a continuation, exactly what it draws alone.
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            candidates = torch.nonzero(ctx.attention_mask[b, : ends[b]].bool().cpu()).flatten()
            n_drop = min(int(ctx.vision[b].sum()), candidates.numel())
            drop = candidates[torch.randperm(candidates.numel(), generator=g)[:n_drop]]
            keep[b, drop.to(keep.device)] = False
        return keep

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        """In expectation the same share of vision and text is drawn; the FLOPs model needs only the total, which is
        exact: ``min(V, V + T - 1)`` tokens go (the last one stays). Reported as text-only after the stage."""
        total = vision + text
        return 0, (total - min(vision, total - 1)) if total else 0

    def budget_candidates(self, num_layers: int) -> list[RandomTokens]:
        return [RandomTokens(layer=k, seed=self.seed) for k in range(num_layers + 1)]

    @property
    def label(self) -> str:
        return "random" if self.layer is None else f"random K={self.layer}"
