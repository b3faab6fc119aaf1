"""A user's own keep rule as a one-stage method: ``withdraw(model, K, method=my_keep)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import OneLayer, StageContext

#: ``keep(hidden_states (B, T, D), vision_mask (B, T) bool, attention_mask (B, T) long) -> keep (B, T) bool``
KeepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CustomKeep(OneLayer):
    """One stage at ``layer`` that keeps what ``keep_fn(hidden, vision, attention_mask)`` returns. For the FLOPs
    model the count of kept tokens is not known in advance: ``stage_tokens`` assumes VTW's (text only)."""

    name = "custom"
    registered = False  # built from a callable, never by name
    keep_fn: KeepFn | None = None

    def __post_init__(self):
        if not callable(self.keep_fn):
            raise ValueError(
                f"a custom method needs a callable keep(hidden, vision, attention_mask), got {self.keep_fn!r}"
            )

    def select(self, ctx: StageContext) -> torch.Tensor:
        return self.keep_fn(ctx.hidden, ctx.vision, ctx.attention_mask)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        return 0, text

    @property
    def label(self) -> str:
        fn = getattr(self.keep_fn, "__name__", type(self.keep_fn).__name__)
        return fn if self.layer is None else f"{fn} K={self.layer}"
