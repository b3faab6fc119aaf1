"""Shared by the methods that read a CLIP vision tower's class-token attention (VisionZip, PruMerge): which towers
they can act on, the tower layers they read, and the tower inputs behind each image grid's cells."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..families import get_family
from ..shapes import has_class_token
from .attention import class_token_attention
from .base import BeforeDecoder, Extra, Merge, StageContext


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
        if video and spec.layout.video.pooled:
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

    def prompt_units(self, layouts, placed, keep: torch.Tensor, whole: int) -> dict[str, list]:
        """Every tower input of the prompt, in encoding order: ``kind -> [(sample, cells (n,) sequence positions,
        patches (n,) patch index in the tower input)]``; the row newlines of a crop grid with a unit of more than
        ``whole`` cells (one the method reduces) are dropped in ``keep`` ``(B, T)``."""
        units = {"image": [], "video": []}
        for b, (layout, grids) in enumerate(zip(layouts, placed)):
            for i, p in enumerate(grids):
                kind = "image" if i < len(layout.images) else "video"
                cells = p.cells.flatten().to(keep.device)
                parts = tower_units(p.grid)
                units[kind].extend((b, cells[local], patch) for local, patch in parts)
                if p.newlines is not None and any(len(local) > whole for local, _ in parts):
                    keep[b, p.newlines.flatten().to(keep.device)] = False
        return units

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


def feature_layer_module(tower: nn.Module, feature_layer, display: str, what: str, receives: bool = False) -> nn.Module:
    """The encoder layer of a CLIP or SigLIP ``tower`` whose output is ``hidden_states[feature_layer]``
    (``hidden_states[0]`` is the embeddings, ``hidden_states[i]`` the output of layer ``i - 1``); ``receives``: the
    layer that receives it as input instead (the last layer where it is the last output). ``what``: the method, for
    the one-line ``ValueError`` of a list-valued or out-of-range ``feature_layer``."""
    layers = (getattr(tower, "encoder", None) or tower.vision_model.encoder).layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"{what} needs one vision_feature_layer; {display}'s config has {feature_layer!r}")
    index = (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) - (0 if receives else 1)
    if not 0 <= index < len(layers) + int(receives):
        raise ValueError(
            f"{what}: vision_feature_layer={feature_layer} of {display} selects no hidden state its tower's "
            f"{len(layers)} layers produce"
        )
    return layers[min(index, len(layers) - 1)]


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


@dataclass(frozen=True)
class UnitChoice:
    """What a method acting in the vision encoder decided for one tower input's unit of ``n`` patches.

    Attributes:
        kept: ``(k,)`` long, the patches kept (indices into the unit's ``n`` patches, :func:`tower_units` order),
            or ``None``: the unit stays whole.
        values: ``(k, Dv)`` the kept patches' new features (before the projector), or ``None``: as they are.
        extra: ``(Dv,)`` one token added after the unit's last cell (before the projector; once the mechanism has
            projected it, ``(Dm,)`` the decoder input), or ``None``.
    """

    kept: torch.Tensor | None
    values: torch.Tensor | None = None
    extra: torch.Tensor | None = None


def encoder_units(config, kind: str, count: int, arguments: dict) -> list[torch.Tensor]:
    """The patches of each of the ``count`` tower inputs of one ``get_image_features`` (``kind="image"``) or
    ``get_video_features`` (``"video"``) call that reach the decoder: ``(n,)`` long patch indices (row-major over the
    input's ``side x side``), in encoding order. LLaVA-NeXT's crops lose the patches the unpadding removes (read from
    the call's ``image_sizes`` in ``arguments``); a fixed-resolution input keeps every patch."""
    from ..grids import image_grids, video_grid

    spec = get_family(config)
    if kind == "video":
        grids = [video_grid(config, 1)] * count
    elif not spec.anyres:
        grids = [image_grids(config)[0]] * count
    else:
        sizes = arguments.get("image_sizes")
        if sizes is None:
            raise RuntimeError(f"vtw: {spec.display} encoded images without image_sizes; their crops are unknown")
        grids = [g for size in sizes.tolist() for g in image_grids(config, tuple(size))]
    units = [patches for g in grids for _, patches in tower_units(g)]
    if len(units) != count:
        raise RuntimeError(f"vtw: {spec.display}'s tower encoded {count} {kind} inputs, the layout gives {len(units)}")
    return units


@dataclass(frozen=True)
class InTower(ClassTokenTower):
    """Base of the methods acting in the vision encoder (:attr:`acts_in` ``"vision_encoder"``): each tower input's
    patches are chosen (and may be merged) on the features the projector receives, from the class token's attention
    in the layer that produced them (:meth:`tower_layer`); the mechanism projects the kept patches (and the added
    tokens) only and places them at their cells, and the decoder's stage 0 drops the others (:meth:`select`). The
    projector's FLOPs follow the kept tokens: every decoder vision token at layer 0 is one projected row, except the
    tokens :meth:`unprojected_tokens` names."""

    acts_in: ClassVar[str] = "vision_encoder"
    #: whether a crop grid keeps its row newlines when its crops are reduced (VisPruner's reference does; PruMerge's
    #: and vtw's VisionZip drop them)
    keeps_newlines: ClassVar[bool] = False

    def reduce_unit(self, attention, keys, features) -> UnitChoice:
        """One unit of ``n`` patches: the class token's ``attention`` ``(n,)``, the patches' ``keys`` ``(n, D)`` and
        the ``features`` ``(n, Dv)`` the projector would receive."""
        raise NotImplementedError

    def decide(self, layer: nn.Module, tower_hidden: torch.Tensor, features: torch.Tensor, units) -> list[UnitChoice]:
        """Every tower input of one encoder call: ``tower_hidden`` ``(N, S_t, D)`` what ``layer`` received (class token
        first), ``features`` ``(N, S, Dv)`` what the projector receives (its last ``side²`` rows are the patches),
        ``units``: :func:`encoder_units`. Returns one :class:`UnitChoice` per input."""
        offset = features.shape[1] - (tower_hidden.shape[1] - 1)  # rows before the patches (a class token kept)
        rows = [i for i, patches in enumerate(units) if len(patches) >= 2]
        out = [UnitChoice(None)] * len(units)
        if rows:
            attention, keys = class_token_attention(layer, tower_hidden[rows], mean_keys=False)
            for r, i in enumerate(rows):
                patches = units[i].to(features.device)
                token = 1 + patches  # tower token 0 is the class token
                out[i] = self.reduce_unit(attention[r, token], keys[r, token], features[i, offset + patches])
        return out

    def unprojected_tokens(self, grid) -> int:
        """Decoder tokens of ``grid`` after the method that are no projector rows: its trailing tokens, and its row
        newlines where they stay (:attr:`keeps_newlines`, or no unit was reducible)."""
        dropped = not self.keeps_newlines and any(len(cells) >= 2 for cells, _ in tower_units(grid))
        return grid.trail + (0 if dropped else grid.frames * grid.rows * grid.newline)

    def select(self, ctx: StageContext) -> Merge:
        """Stage 0: the cells of the patches each unit dropped go, the added tokens follow each unit's last cell."""
        layouts, placed = self.placed_grids(ctx)
        keep = torch.ones_like(ctx.vision)
        anchors: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(keep.shape[0])]
        whole = len(keep[0]) if self.keeps_newlines else 1  # newlines go where a unit of more cells is
        for kind, found in self.prompt_units(layouts, placed, keep, whole).items():
            chosen = (ctx.tower_choices or {}).get(kind, [])
            if len(chosen) < len(found):
                raise RuntimeError(f"{self.label}: the prompt has {len(found)} {kind} encoder inputs, the tower "
                                   f"chose for {len(chosen)} (give pixel inputs, not features)")  # fmt: skip
            for (b, cells, _), choice in zip(found, chosen[len(chosen) - len(found) :]):
                if choice.kept is None:
                    continue
                keep[b, cells] = False
                keep[b, cells[choice.kept.to(cells.device)]] = True
                if choice.extra is not None:
                    anchors[b].append((int(cells.max()), choice.extra))
        return Merge(keep, None, _extra(anchors, ctx))


def _extra(anchors: list[list[tuple[int, torch.Tensor]]], ctx: StageContext) -> Extra | None:
    """Added tokens: ``anchors[b]`` = ``[(column it follows, value (Dm,))]``; one whose column is not before the
    sample's query (last prompt) column is left out."""
    query = ctx.query_or_last().tolist()
    anchors = [[(c, v) for c, v in row if c < q] for row, q in zip(anchors, query)]
    slots = max(map(len, anchors))
    if not slots:
        return None
    batch, _, width = ctx.hidden.shape
    device = ctx.hidden.device
    hidden = torch.zeros(batch, slots, width, dtype=ctx.hidden.dtype, device=device)
    valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    after = torch.zeros(batch, slots, dtype=torch.long, device=device)
    for b, row in enumerate(anchors):
        for e, (column, value) in enumerate(row):
            hidden[b, e], valid[b, e], after[b, e] = value.to(hidden.dtype), True, column
    return Extra(hidden, valid, after)
