"""Token reducers: which tokens go on to the deep layers ``K..L-1``.

A reducer is the plug-in point of the withdrawal mechanism (:mod:`vtw.withdraw`): at layer ``K`` of a prefill it is
given the hidden states and the masks and returns which positions to keep. Everything else (repacking, positions,
per-layer attention masks, the text-only KV cache of deep layers, decode steps) is shared. VTW keeps every non-vision
token; an attention-ranked method such as FastV would keep text plus its top-ranked vision tokens by implementing
``keep`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``keep(hidden_states (B, T, D), vision_mask (B, T) bool, attention_mask (B, T) long) -> keep (B, T) bool``
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def withdraw_vision(
    hidden_states: torch.Tensor, vision_mask: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """VTW: keep every token that is not a vision token (padding stays, still masked)."""
    return ~vision_mask


@dataclass(frozen=True)
class RandomTokens:
    """Ablation from the paper: drop as many *random* non-padding tokens as the sample has vision tokens.

    The last token of every sample is always kept (the next token is predicted from it). Seeded, so runs repeat.
    """

    seed: int = 0

    def __call__(self, hidden_states: torch.Tensor, vision_mask: torch.Tensor, attention_mask: torch.Tensor):
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        keep = torch.ones_like(vision_mask)
        for b in range(vision_mask.shape[0]):
            n_drop = int(vision_mask[b].sum())
            candidates = torch.nonzero(attention_mask[b, :-1].bool().cpu()).flatten()
            n_drop = min(n_drop, candidates.numel())
            drop = candidates[torch.randperm(candidates.numel(), generator=g)[:n_drop]]
            keep[b, drop.to(keep.device)] = False
        return keep


REDUCERS: dict[str, Callable[[], Reducer]] = {
    "vtw": lambda: withdraw_vision,
    "random": RandomTokens,
}


def get_reducer(method: str) -> Reducer:
    if method not in REDUCERS:
        raise ValueError(f"unknown withdrawal method {method!r}; allowed: {sorted(REDUCERS)}")
    return REDUCERS[method]()
