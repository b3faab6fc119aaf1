"""VisionZip: per image (per video frame), the patches the vision tower's class token attends to most, plus a few
contextual tokens that merge the rest by key similarity, before the decoder."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from .attention import class_token_attention, class_token_attention_flops
from .base import Merge, StageContext, check_int
from .towers import ClassTokenTower, tower_units

#: tokens per image (per frame) the matched-compute search tries (``vtw.budget``), least compute first: up to 576,
#: CLIP-L/336's 24 x 24 patches (the largest grid of the supported towers)
TOTALS: tuple[int, ...] = tuple(range(1, 577))
#: the paper's contextual share of the tokens (LLaVA-1.5: 54+10, 108+20, 162+30)
CONTEXTUAL_SHARE = 10 / 64


@dataclass(frozen=True)
class VisionZip(ClassTokenTower):
    """Keep ``dominant + contextual`` tokens of each image and each video frame (of ``n`` patches; nothing changes
    where ``n <= dominant + contextual``), chosen in the vision tower's feature layer: the layer whose output
    ``vision_feature_layer`` selects (CLIP layer -2 for LLaVA-1.5).

    * dominant: the ``dominant`` patches with the highest attention from the class token in that layer (softmax over
      all the tower's tokens, mean over heads);
    * contextual: of the other ``n - dominant`` patches (in grid order), ``contextual`` targets evenly strided
      (every ``max(1, (n - dominant) // contextual)``-th, from the first); every other patch joins the target whose
      key is most similar (cosine of that layer's keys, mean over heads, as the reference does), and each target
      becomes the mean of itself and the patches that joined it.

    The tokens merged are the decoder's inputs (the projected features), each kept token at its own position
    (dominant and target tokens keep their position ids; nothing is renumbered); class tokens in the sequence
    (Video-LLaVA's video frames) stay. Two differences from the reference code, which works before the projector:
    there the class token itself is one of the ``dominant`` tokens fed to the decoder (LLaVA drops it here: vtw's
    ``dominant`` are all patches), and a contextual token is ``target + mean(joined)`` where vtw averages the target
    with the patches that joined it (a token of the same scale as the others).

    The attention and keys are recomputed from the feature layer's own norm and projections on its input, caught
    by a forward pre-hook (:func:`~vtw.methods.attention.class_token_attention`): the tower keeps SDPA. Towers
    with a class token only: LLaVA-1.5, Video-LLaVA (images and the frames of its video tower) and LLaVA-NeXT(-Video)
    images, per crop as the paper does: the base crop, and each crop of the unpadded crop grid on the patches the
    unpadding left (a crop with at most ``dominant + contextual`` of them stays whole); a crop grid that is
    reduced loses its row newlines (the reference keeps none). LLaVA-NeXT-Video's pooled video frames: an error.
    """

    name = "visionzip"
    free_parameter = "dominant"
    dominant: int = 54
    contextual: int = 10

    def __post_init__(self):
        check_int(self.dominant, "visionzip dominant")
        check_int(self.contextual, "visionzip contextual")
        if self.dominant + self.contextual < 1:
            raise ValueError(
                f"visionzip keeps dominant + contextual tokens per image; got {self.dominant} + {self.contextual}: "
                "at least one is needed"
            )

    @property
    def tokens(self) -> int:
        """Tokens kept per image / video frame."""
        return self.dominant + self.contextual

    def stages(self) -> tuple[int, ...]:
        return (0,)

    @property
    def label(self) -> str:
        return f"visionzip {self.dominant}+{self.contextual}"

    def budget_candidates(self, num_layers: int) -> list[VisionZip]:
        """Totals ``1..576`` per image split as the paper's defaults (``contextual = round(total · 10/64)``)."""
        out = []
        for total in TOTALS:
            contextual = round(total * CONTEXTUAL_SHARE)
            out.append(replace(self, dominant=total - contextual, contextual=contextual))
        return out

    # ------------------------------------------------------------------ the model
    reads: ClassVar[str] = "ranks patches by"

    def tower_layer(self, tower: nn.Module, feature_layer, display: str) -> nn.Module:
        return _feature_layer(tower, feature_layer, display)

    def acts_on(self, model: nn.Module) -> bool:
        """False where every image / frame / crop keeps all its patches (``side² <= dominant + contextual``)."""
        return self.tower_patches(model) > self.tokens

    def grid_tokens(self, grid) -> int:
        sizes = [len(cells) for cells, _ in tower_units(grid)]
        if all(n <= self.tokens for n in sizes):
            return grid.tokens
        return grid.frames * grid.lead + sum(min(n, self.tokens) for n in sizes) + grid.trail

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """Per image / frame / crop reduced: :func:`~vtw.methods.attention.class_token_attention_flops` of its
        tower input (``side² + 1`` tokens) and the cosine similarities of its ``n - dominant - contextual`` merged
        patches with the ``contextual`` targets (``head_dim`` each)."""
        vc = config.vision_config
        hidden, heads = int(vc.hidden_size), int(vc.num_attention_heads)
        length = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
        total = 0
        for grid in layout.grids:
            for cells, _ in tower_units(grid):
                if len(cells) > self.tokens:
                    cosine = 2 * (len(cells) - self.tokens) * self.contextual * (hidden // heads)
                    total += class_token_attention_flops(hidden, length) + cosine
        return total

    # ------------------------------------------------------------------ the choice
    def select(self, ctx: StageContext) -> Merge:
        layouts, placed = self.placed_grids(ctx)
        keep = torch.ones_like(ctx.vision)
        hidden = ctx.hidden.clone()
        # every tower input of the prompt, in batch order (an image, a crop, a video frame): kind -> [(sample, cells,
        # sequence positions (n,) of its cells, patch index (n,) of each in the tower input)]
        units = {"image": [], "video": []}
        for b, (layout, grids) in enumerate(zip(layouts, placed)):
            for i, p in enumerate(grids):
                kind = "image" if i < len(layout.images) else "video"
                cells = p.cells.flatten().to(hidden.device)
                parts = tower_units(p.grid)
                units[kind].extend((b, cells[local], patch) for local, patch in parts)
                if p.newlines is not None and any(len(local) > self.tokens for local, _ in parts):
                    keep[b, p.newlines.flatten().to(hidden.device)] = False  # as the reference: no newlines left
        for kind, found in units.items():
            if not found:
                continue
            layer, inputs_seen = self.tower_inputs(ctx, kind, len(found))
            reduced = [j for j, (_, cells, _) in enumerate(found) if len(cells) > self.tokens]
            if not reduced:
                continue
            attention, keys = class_token_attention(layer, inputs_seen[reduced].to(hidden.device))
            for row, j in enumerate(reduced):
                b, cells, patch = found[j]
                patch = 1 + patch.to(hidden.device)  # tower token 0 is the class token
                self._zip(cells, attention[row, patch], keys[row, patch], ctx.hidden[b], hidden[b], keep[b])
        return Merge(keep, hidden)

    def _zip(self, cells, attention, keys, values, out, keep) -> None:
        """One tower input: ``cells`` ``(n,)`` sequence positions of its patches in grid order; ``attention``
        ``(n,)`` and ``keys`` ``(n, hd)`` of those patches; ``values`` ``(T, D)`` the decoder inputs; writes the
        merged values into ``out`` ``(T, D)`` and the choice into ``keep`` ``(T,)``."""
        n = cells.numel()
        order = torch.argsort(attention, descending=True, stable=True)
        dominant = order[: self.dominant]
        rest = torch.ones(n, dtype=torch.bool, device=cells.device)
        rest[dominant] = False
        rest = torch.nonzero(rest).flatten()  # in grid order
        keep[cells] = False
        keep[cells[dominant]] = True
        if self.contextual == 0:
            return
        step = max(1, rest.numel() // self.contextual)
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=cells.device)
        is_target[torch.arange(0, rest.numel(), step, device=cells.device)[: self.contextual]] = True
        targets, others = rest[is_target], rest[~is_target]
        unit = nn.functional.normalize(keys.float(), dim=-1)
        joins = torch.matmul(unit[others], unit[targets].T).argmax(1)  # (n_others,) index into targets
        group = torch.cat([torch.arange(targets.numel(), device=cells.device), joins])
        members = torch.cat([targets, others])
        sums = torch.zeros(targets.numel(), values.shape[-1], device=values.device)
        sums.index_add_(0, group, values[cells[members]].float())
        counts = torch.bincount(group, minlength=targets.numel()).to(sums)
        out[cells[targets]] = (sums / counts[:, None]).to(out.dtype)
        keep[cells[targets]] = True


def _feature_layer(tower: nn.Module, feature_layer, display: str) -> nn.Module:
    """The encoder layer of a CLIP ``tower`` whose output ``hidden_states[feature_layer]`` is (``hidden_states[0]``
    is the embeddings, ``hidden_states[i]`` the output of layer ``i - 1``)."""
    encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder
    layers = encoder.layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"visionzip needs one vision_feature_layer; {display}'s config has {feature_layer!r}")
    index = feature_layer - 1 if feature_layer >= 0 else len(layers) + feature_layer
    if not 0 <= index < len(layers):
        raise ValueError(
            f"visionzip: vision_feature_layer={feature_layer} of {display} selects no encoder layer's output "
            f"(the tower has {len(layers)} layers)"
        )
    return layers[index]
