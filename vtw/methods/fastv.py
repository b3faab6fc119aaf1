"""FastV: at layer ``K``, keep the vision tokens the last prompt token attends to most in layer ``K-1``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import last_token_attention
from .base import Reduction, StageContext, check_layer
from .ranking import KeepShare, check_keep, keep_top_vision, kept_count


@dataclass(frozen=True)
class FastV(KeepShare, Reduction):
    """Rank each sample's ``V_b`` vision tokens by the attention probability the last prompt token gives them in
    layer ``K-1`` (softmax, mean over query heads; GQA included) and keep the top ``ceil(keep · V_b)`` from layer
    ``K`` on, with every text token, at their original positions. The scores are recomputed from layer ``K-1``'s
    own weights on the hidden states it received (:func:`~vtw.methods.attention.last_token_attention`): no layer runs
    twice, the model keeps its SDPA. ``keep=1`` keeps everything, so nothing is installed.
    """

    name = "fastv"
    free_parameter = "keep"
    uses_previous_layer = True
    layer: int = 2
    keep: float = 0.5

    def __post_init__(self):  # the layer is checked by resolve(), against L
        object.__setattr__(self, "keep", check_keep(self.keep, "fastv keep"))

    def resolve(self, num_layers: int) -> FastV:
        if check_layer(self.layer, num_layers, "fastv layer") is None or self.layer < 1:
            raise ValueError(
                f"fastv layer must be an integer in [1, {num_layers}] (it ranks by layer K-1's attention), got "
                f"{self.layer!r}"
            )
        return self

    def stages(self) -> tuple[int, ...]:
        return () if self.keep == 1 else (self.layer,)

    def select(self, ctx: StageContext) -> torch.Tensor:
        prev = ctx.previous
        scores = last_token_attention(
            prev.module, prev.hidden, prev.position_embeddings, ctx.attention_mask, query=ctx.query
        )
        counts = [kept_count(self.keep, int(n)) for n in ctx.vision.sum(1).tolist()]
        return keep_top_vision(scores, ctx.vision, counts)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        return kept_count(self.keep, vision), text

    @property
    def label(self) -> str:
        return f"fastv K={self.layer} keep={self.keep:.3g}"

    def scored_inputs(self, num_layers: int) -> tuple[int, ...]:
        return (self.layer - 1,) if self.stages() and self.layer < num_layers else ()
