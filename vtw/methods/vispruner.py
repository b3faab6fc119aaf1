"""VisPruner (and FasterVLM, its important-only case): per image (per video frame, per crop), the patches the vision
tower's class token attends to most, then diverse patches: what is left of the others once near-duplicates are
removed round by round. In the vision encoder, so the projector runs on the kept patches only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .attention import class_token_attention_flops
from .ranking import KeepShare, check_keep, kept_count
from .towers import InTower, UnitChoice, feature_layer_module, tower_units

#: the reference's most near-duplicates removed per round
PER_ROUND = 8


@dataclass(frozen=True)
class VisPruner(KeepShare, InTower):
    """Keep ``t = ceil(keep · n)`` of the ``n`` patches of each tower input (an image, a video frame, a LLaVA-NeXT
    crop; a unit with ``t >= n`` stays whole): ``floor(important · t)`` important and ``t - floor(important · t)``
    diverse ones, chosen in the tower layer whose output the projector receives (``hidden_states[-2]`` for LLaVA's
    ``vision_feature_layer=-2``: the class token's attention of that layer, softmax over all the input's tokens, mean
    over heads, as the reference reads ``attentions[-2]``):

    1. important: the patches with the highest attention (ties: the earlier patch);
    2. diverse: the others, ranked by attention, lose near-duplicates round by round until ``d`` are left. A round
       over the ``R`` left (in their current order) splits them into ``A`` (positions 0, 2, 4, ...) and ``B`` (1, 3,
       ...), scores each token of ``A`` by its highest cosine similarity to a token of ``B`` (on the features the
       projector receives, ``hidden_states[vision_feature_layer]``), removes the ``min(8, R - d, |A|)`` of ``A`` with
       the highest scores, and orders what is left as ``A``'s rest by descending score, then ``B``. The cosines of
       the ``n - important`` tokens are computed once (the reference recomputes each round's ``A x B`` block).

    ``important=1`` keeps the top ``t`` by attention and nothing else: FasterVLM (its reference takes the top-k of the
    same attention). The paper's settings on LLaVA-1.5 are 128, 64 and 32 of 576 patches, half of them important;
    the defaults are 64 (``keep=1/9``, VisionZip's default count in vtw) and ``important=0.5`` (the reference's).

    The kept patches go through the projector (:class:`~vtw.methods.towers.InTower`), each at its own position
    (nothing renumbered), class tokens in the sequence (Video-LLaVA's video frames) and LLaVA-NeXT's row newlines stay
    (the reference keeps every newline). LLaVA-1.5, Video-LLaVA (images and video frames) and LLaVA-NeXT(-Video)
    images; towers without a class token and LLaVA-NeXT-Video's pooled video frames: an error.

    Deviations from the reference code (LLaVA-1.5 and LLaVA-NeXT images, fixed counts per tower input):

    * LLaVA-NeXT: the reference keeps ``t`` of each padded crop's 576 patches, and the unpadding then drops the kept
      ones that were padding; here each crop chooses among the patches the unpadding left (``t`` of its ``n``).
    * ``t`` is a share (``keep``) of each tower input, not a count; ``ceil`` where ``keep · n`` is not integral.
    * ties in the attention and the similarity scores go to the earlier patch (the reference's sorts are unstable);
      an odd ``R`` splits into ``ceil(R/2)`` and ``floor(R/2)`` (the reference fails on it: its index shapes
      disagree; ``R`` starts odd where an odd number of important tokens is kept with diverse ones).
    * the reference projects every patch and drops the pruned ones after; here only the kept ones are projected.
    """

    name = "vispruner"
    free_parameter = "keep"
    keeps_newlines: ClassVar[bool] = True  # the row newlines stay, as the reference's
    keep: float = 64 / 576
    important: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "keep", check_keep(self.keep, "vispruner keep"))
        value = self.important
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(
                f"vispruner important must be a number in [0, 1] (the share of the kept tokens chosen by the class "
                f"token's attention; 1: FasterVLM), got {value!r}"
            )
        object.__setattr__(self, "important", float(value))

    def stages(self) -> tuple[int, ...]:
        return () if self.keep == 1 else (0,)

    @property
    def label(self) -> str:
        return f"vispruner keep={self.keep:.3g} important={self.important:.3g}"

    def split(self, n: int) -> tuple[int, int] | None:
        """``(important, diverse)`` patches kept of a unit of ``n``; ``None`` where it stays whole."""
        total = kept_count(self.keep, n)
        if total >= n:
            return None
        important = math.floor(round(total * self.important, 9))
        return important, total - important

    # ------------------------------------------------------------------ the model
    reads: ClassVar[str] = "ranks patches by"

    def tower_layer(self, tower: nn.Module, feature_layer, display: str) -> nn.Module:
        return feature_layer_module(tower, feature_layer, display, self.name)

    def acts_on(self, model: nn.Module) -> bool:
        """False where a whole tower input keeps all its patches (so does every smaller LLaVA-NeXT crop)."""
        return self.split(self.tower_patches(model)) is not None

    def grid_tokens(self, grid) -> int:
        dropped = 0
        for cells, _ in tower_units(grid):
            split = self.split(len(cells))
            dropped += 0 if split is None else len(cells) - sum(split)
        return grid.tokens - dropped

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """Per tower input reduced: :func:`~vtw.methods.attention.class_token_attention_flops` of its ``side² + 1``
        tokens, and where it keeps diverse tokens, the cosines of its ``R = n - important`` other patches, once
        (``2 · R² · Dv``, ``Dv`` the tower's width; the rounds read blocks of them). Follows the layout, not the data;
        ``tokens`` is not needed, ``layout`` is (``ValueError`` without it)."""
        if layout is None:
            raise ValueError(f"{self.label}: its scoring FLOPs depend on each image's grid; give the sample's layout")
        vc = config.vision_config
        width = int(vc.hidden_size)
        length = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
        total = 0
        for grid in layout.grids:
            for cells, _ in tower_units(grid):
                split = self.split(len(cells))
                if split is not None:
                    residual = len(cells) - split[0]
                    total += class_token_attention_flops(width, length) + (2 * residual**2 * width if split[1] else 0)
        return total

    # ------------------------------------------------------------------ the choice
    def reduce_unit(self, attention, keys, features) -> UnitChoice:
        """One unit of ``n`` patches: the class token's ``attention`` ``(n,)`` and the ``features`` ``(n, Dv)`` the
        projector would receive (``keys`` are not read; the cosines in float32, or float64 features' own precision).
        The kept patches, ``(t,)`` ascending, or a whole unit."""
        split = self.split(attention.numel())
        if split is None:
            return UnitChoice(None)
        important, diverse = split
        order = torch.sort(attention.float(), descending=True, stable=True).indices
        kept = order[:important]
        if diverse:
            wide = torch.promote_types(features.dtype, torch.float32)
            unit = nn.functional.normalize(features.to(wide), dim=-1)
            kept = torch.cat([kept, remove_duplicates(unit, order[important:], diverse)])
        return UnitChoice(kept.sort().values)


def removal_rounds(residual: int, diverse: int) -> list[int]:
    """How many tokens each round removes, taking ``residual`` tokens down to ``diverse``: ``min(8, R - diverse,
    ceil(R / 2))`` of the ``R`` left (none where ``diverse`` is 0: only the important tokens are kept)."""
    rounds = []
    while diverse and residual > diverse:
        rounds.append(min(PER_ROUND, residual - diverse, (residual + 1) // 2))
        residual -= rounds[-1]
    return rounds


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, diverse: int) -> torch.Tensor:
    """The ``diverse`` tokens left of ``residual`` ``(R,)`` (indices into the unit-norm features ``unit`` ``(n, Dv)``,
    in their order) after the removal rounds (:class:`VisPruner`): ``(diverse,)`` long. The cosines of the ``R``
    tokens are computed once (one ``R x R`` matmul); each round reads its ``A x B`` block."""
    rounds = removal_rounds(residual.numel(), diverse)
    if not rounds:
        return residual
    similarity = torch.matmul(unit[residual], unit[residual].T)  # (R, R)
    left = torch.arange(residual.numel(), device=residual.device)  # positions in residual, in the current order
    for removed in rounds:
        a, b = left[0::2], left[1::2]
        scores = similarity[a[:, None], b[None, :]].amax(1)  # (|A|,) each one's nearest token of B
        order = torch.sort(scores, descending=True, stable=True).indices
        left = torch.cat([a[order[removed:]], b])
    return residual[left]
