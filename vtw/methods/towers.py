"""Shared by the methods that read a CLIP vision tower's class-token attention (VisionZip, PruMerge): which towers
they can act on, the tower layers they read, and the tower inputs behind each image grid's cells."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..families import get_family
from ..grids import has_class_token
from .base import BeforeDecoder, StageContext


@dataclass(frozen=True)
class ClassTokenTower(BeforeDecoder):
    """Base of the methods acting before the decoder that decide from the class token's attention in a layer of each
    vision tower (:meth:`tower_layer`; the mechanism records what that layer received, ``StageContext.vision_layer``).
    Towers with a class token only (CLIP; not SigLIP, not the Qwen ViTs), and no pooled video frames."""

    uses_vision_layer: ClassVar[bool] = True
    #: how the method uses the class token's attention, for its refusal (``"ranks patches by"``)
    reads: ClassVar[str] = "reads"

    def tower_layer(self, tower: nn.Module, feature_layer, display: str) -> nn.Module:
        """The layer of ``tower`` whose input the method reads, given the config's ``vision_feature_layer``."""
        raise NotImplementedError

    def check_supported(self, config, *, video: bool = False) -> None:
        spec = get_family(config)
        if not has_class_token(config):
            kind = getattr(config.vision_config, "model_type", "?")
            raise ValueError(
                f"{self.name} cannot act on {spec.display}: it {self.reads} the vision tower's class-token (CLS) "
                f"attention, and {spec.display}'s tower ({kind}) has no class token; {self.name} supports the CLIP "
                "towers of LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video (images) and Video-LLaVA"
            )
        if video and spec.video == "pooled":
            raise ValueError(
                f"{self.name} on {spec.display}: its video frames are pooled before the projector, so their tokens "
                "are no tower patches with a class-token attention of their own; give it images only"
            )

    def vision_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        config, spec = model.config, get_family(model)
        self.check_supported(config)
        towers = {"image": spec.module(model, "vision_tower")}
        if spec.video_tower is not None:
            towers["video"] = spec.module(model, "video_tower")
        return {kind: self.tower_layer(t, config.vision_feature_layer, spec.display) for kind, t in towers.items()}

    def tower_patches(self, model: nn.Module) -> int:
        """Patches per tower input (``side²``), once the model's towers are checked (:meth:`vision_layers`)."""
        self.vision_layers(model)
        vc = model.config.vision_config
        return (int(vc.image_size) // int(vc.patch_size)) ** 2

    def tower_inputs(self, ctx: StageContext, kind: str, count: int) -> tuple[nn.Module, torch.Tensor]:
        """The layer read in the tower that encoded ``kind`` and its last ``count`` inputs ``(count, S, D)``."""
        seen = (ctx.vision_layer or {}).get(kind)
        if seen is None or seen[1].shape[0] < count:
            raise RuntimeError(
                f"{self.label}: the prompt has {count} {kind} encoder inputs but the vision tower encoded "
                f"{0 if seen is None else seen[1].shape[0]} since the last forward (give pixel inputs, not features)"
            )
        layer, hidden = seen
        return layer, hidden[hidden.shape[0] - count :]


def tower_units(grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tower inputs behind a :class:`~vtw.grids.Grid`'s cells, in encoding order: one per frame, or one per
    crop of an anyres crop grid (``grid.tiling``; a crop whose patches were all padding has no cells but was
    encoded). Each is ``(cells (n,), patches (n,))``: the cells' indices in ``grid.cell_index().flatten()`` and
    their patch index in that tower input (row-major over its ``side x side`` patches)."""
    n = grid.rows * grid.cols
    if grid.tiling is None:
        return [(torch.arange(f * n, (f + 1) * n), torch.arange(n)) for f in range(grid.frames)]
    crop_rows, crop_cols, side = grid.tiling
    r = torch.arange(grid.rows) + (crop_rows * side - grid.rows) // 2  # rows / cols in the padded crop grid
    c = torch.arange(grid.cols) + (crop_cols * side - grid.cols) // 2
    crop = ((r // side)[:, None] * crop_cols + (c // side)[None, :]).flatten()
    patch = ((r % side)[:, None] * side + (c % side)[None, :]).flatten()
    out = []
    for k in range(crop_rows * crop_cols):
        local = torch.nonzero(crop == k).flatten()
        out.append((local, patch[local]))
    return out
