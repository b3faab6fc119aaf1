"""VisionZip: per image (per video frame, per crop), the patches the vision tower attends to most, plus a few
contextual tokens that merge the rest by key similarity, before the decoder.

Two variants, by tower (:meth:`VisionZip.variant`):

* ``"class-token"`` (the paper's): CLIP towers (LLaVA-1.5, LLaVA-NeXT images, LLaVA-NeXT-Video images, Video-LLaVA):
  the attention the class token gives each patch in the tower's feature layer;
* ``"received"`` (LightCompress's Qwen2.5-VL variant, for towers without a class token: LLaVA-OneVision's SigLIP,
  the Qwen2-VL and Qwen2.5-VL ViTs): the attention each patch *receives* in the tower's last layer (the feature
  layer for SigLIP, ``vision_feature_layer=-1``), mean over heads and over the queries of its tower input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from ..families import get_family
from ..shapes import best_resolution, has_class_token
from .attention import class_token_attention, class_token_attention_flops
from .base import Merge, StageContext, check_int
from .towers import ClassTokenTower, feature_layer_module, tower_units

#: tokens per image (per frame) the matched-compute search tries (``vtw.budget``), least compute first: up to 576,
#: CLIP-L/336's 24 x 24 patches (the largest grid of the supported towers)
TOTALS: tuple[int, ...] = tuple(range(1, 577))
#: the paper's contextual share of the tokens (LLaVA-1.5: 54+10, 108+20, 162+30)
CONTEXTUAL_SHARE = 10 / 64
#: the most attention probabilities (heads x queries x keys) :func:`received_attention` holds at once
CHUNK = 1 << 24


@dataclass(frozen=True)
class _Unit:
    """One tower input's decoder tokens (the received variant), in encoding order.

    Attributes:
        sample: the batch row; cells: ``(n,)`` their sequence positions, in grid order.
        rows: what it takes of the recorded tower inputs: fixed towers, inputs ``(S, D)`` each; Qwen, patch rows.
        how: how a cell comes from the tower's patches: ``"pick"`` one patch (``patch``), ``"resize"`` the bilinear
            resize of a ``side x side`` frame to the cells' grid (``shape = (side, cells' side)``; LLaVA-OneVision's
            video frames), ``"merge"`` the mean of its merged patches (Qwen; ``shape = (h, w)`` patches of the slice),
            ``"whole"``: left whole (LLaVA-OneVision's downscaled crop grids: their cells mix crops).
    """

    sample: int
    cells: torch.Tensor
    rows: int
    how: str
    patch: torch.Tensor | None = None
    shape: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class VisionZip(ClassTokenTower):
    """Keep ``dominant + contextual`` tokens of each image and each video frame (of ``n`` tokens; nothing changes
    where ``n <= dominant + contextual``), chosen in the vision tower:

    * dominant: the ``dominant`` tokens with the highest score (below);
    * contextual: of the other ``n - dominant`` tokens (in grid order), ``contextual`` targets evenly strided
      (every ``max(1, (n - dominant) // contextual)``-th, from the first); every other token joins the target whose
      key is most similar (cosine of the scored layer's keys, mean over heads, as the reference does), and each
      target becomes the mean of itself and the tokens that joined it.

    The score, by tower (:meth:`variant`):

    * ``"class-token"`` (CLIP: LLaVA-1.5, Video-LLaVA images and the frames of its video tower, LLaVA-NeXT(-Video)
      images, per crop as the paper does): the attention the class token gives each patch in the layer whose output
      ``vision_feature_layer`` selects (CLIP layer -2 for LLaVA-1.5; softmax over all the tower's tokens, mean over
      heads); keys: that layer's ``k_proj``. LLaVA-NeXT: the base crop, and each crop of the unpadded crop grid on
      the patches the unpadding left (a crop with at most ``dominant + contextual`` of them stays whole).
    * ``"received"`` (no class token: LLaVA-OneVision's SigLIP, the Qwen2-VL / Qwen2.5-VL ViTs; LightCompress's
      Qwen2.5-VL VisionZip): the attention each patch receives in the tower's last layer (SigLIP: the layer
      ``vision_feature_layer`` selects, -1 in LLaVA-OneVision; Qwen: the last block, which must be a full-attention
      block in Qwen2.5-VL), softmax per query over its tower input's patches, mean over heads and queries; keys:
      that layer's (rotary applied in Qwen, as its attention uses them), mean over heads. A decoder token's score and
      key are what the model makes of its patches' features: one patch (SigLIP crops and images), the mean of its
      ``m x m`` merged patches (Qwen; LightCompress takes this mean too), the bilinear resize of the frame
      (LLaVA-OneVision's video frames). Units: each SigLIP crop (base crop and each crop of the unpadded grid, as
      LLaVA-NeXT) or image or video frame; each Qwen image and each temporal slice of a Qwen video (its ViT attends
      within a slice). LLaVA-OneVision's downscaled crop grids (``anyres_max``) stay whole: their cells mix crops.

    The tokens merged are the decoder's inputs (the projected features), each kept token at its own position
    (dominant and target tokens keep their position ids; nothing is renumbered); class tokens in the sequence
    (Video-LLaVA's video frames) and row newlines of crop grids not reduced stay; a crop grid that is reduced loses
    its row newlines (the reference keeps none). Differences from the reference code, which works before the
    projector: there the class token itself is one of the ``dominant`` tokens fed to the decoder (LLaVA drops it
    here: vtw's ``dominant`` are all patches), and a contextual token is ``target + mean(joined)`` where vtw
    averages the target with the tokens that joined it (a token of the same scale as the others); LightCompress's
    Qwen2.5-VL variant takes ``dominant`` / ``contextual`` as shares of all the prompt's vision tokens together.

    The attention and keys are recomputed from the scored layer's own norm and projections on its input, caught by a
    forward pre-hook: the tower keeps SDPA. LLaVA-NeXT-Video's pooled video frames: an error.
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
        """Tokens kept per image / video frame / crop."""
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

    @staticmethod
    def variant(config) -> str:
        """``"class-token"`` (a tower with a class token: CLIP) or ``"received"`` (SigLIP, the Qwen ViTs)."""
        return "class-token" if has_class_token(config) else "received"

    def check_supported(self, config, *, video: bool = False) -> None:
        if self.variant(config) == "class-token":
            return super().check_supported(config, video=video)
        spec, vc = get_family(config), config.vision_config
        if video and spec.layout.video.pooled:
            raise ValueError(
                f"visionzip on {spec.display}: its video frames are pooled before the projector, so their tokens are "
                "no tower patches; give it images only"
            )
        if spec.encoder == "qwen2_5_vl":
            last, full = int(vc.depth) - 1, [int(i) for i in vc.fullatt_block_indexes]
            if last not in full:
                raise ValueError(
                    f"visionzip cannot act on {spec.display}: it ranks patches by the attention they receive in the "
                    f"tower's last block, and block {last} attends within windows (fullatt_block_indexes={full})"
                )

    def tower_layer(self, tower: nn.Module, feature_layer, display: str) -> nn.Module:
        return feature_layer_module(tower, feature_layer, display, self.name)

    def vision_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The class-token variant: the feature layer of each tower; received: the tower's scored layer (SigLIP's
        feature layer, the Qwen ViT's last block), which encodes the videos as well."""
        if self.variant(model.config) == "class-token":
            return super().vision_layers(model)
        self.check_supported(model.config)
        spec = get_family(model)
        tower = spec.module(model, "vision_tower")
        if spec.encoder == "fixed":
            return {"image": self.tower_layer(tower, model.config.vision_feature_layer, spec.display)}
        return {"image": tower.blocks[-1]}

    def acts_on(self, model: nn.Module) -> bool:
        """False where every image / frame / crop keeps all its tokens: fixed towers, ``side² <= dominant +
        contextual`` (crops have the most tokens); Qwen: True (the tokens of an image depend on its size)."""
        if get_family(model).encoder != "fixed":
            self.vision_layers(model)
            return True
        return self.tower_patches(model) > self.tokens

    def grid_tokens(self, grid) -> int:
        if _downscaled(grid):
            return grid.tokens
        sizes = [len(cells) for cells, _ in tower_units(grid)]
        if all(n <= self.tokens for n in sizes):
            return grid.tokens
        return grid.frames * grid.lead + sum(min(n, self.tokens) for n in sizes) + grid.trail

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """Per image / frame / crop reduced: the scores of its tower input (class token:
        :func:`~vtw.methods.attention.class_token_attention_flops` over ``side² + 1`` tokens; received:
        :func:`received_attention_flops` over its ``S`` patches) and the cosine similarities of its ``n - dominant -
        contextual`` merged tokens with the ``contextual`` targets (``head_dim`` each)."""
        from ..arch import architecture

        vision = architecture(config).vision
        received = self.variant(config) == "received"
        head_dim = vision.hidden // vision.heads
        total = 0
        for grid in layout.grids:
            if _downscaled(grid):
                continue
            for cells, _ in tower_units(grid):
                n = len(cells)
                if n <= self.tokens:
                    continue
                total += 2 * (n - self.tokens) * self.contextual * head_dim
                if not received:
                    total += class_token_attention_flops(vision.hidden, vision.tokens_per_input)
                elif vision.image_size is None:  # a Qwen slice: m x m patches per token
                    total += received_attention_flops(vision.hidden, n * vision.spatial_merge**2)
                else:
                    total += received_attention_flops(vision.hidden, vision.patches_per_input)
        return total

    # ------------------------------------------------------------------ the choice
    def select(self, ctx: StageContext) -> Merge:
        if self.variant(ctx.model.config) == "received":
            return self._select_received(ctx)
        layouts, placed = self.placed_grids(ctx)
        keep = torch.ones_like(ctx.vision)
        hidden = ctx.hidden.clone()
        units = self.prompt_units(layouts, placed, keep, self.tokens)  # a reduced crop grid: no newlines left
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

    def _select_received(self, ctx: StageContext) -> Merge:
        """:meth:`select` where the tower has no class token: every tower input's tokens scored by the attention its
        patches receive (the class docstring)."""
        layouts, placed = self.placed_grids(ctx)
        config = ctx.model.config
        spec = get_family(config)
        keep = torch.ones_like(ctx.vision)
        hidden = ctx.hidden.clone()
        units = self._received_units(config, layouts, placed, keep, ctx.inputs or {})
        if not any(self._reduces(u) for u in units):
            return Merge(keep, hidden)
        layer, seen = self.tower_inputs(ctx, "image", sum(u.rows for u in units))
        tower = spec.module(ctx.model, "vision_tower")
        start = 0
        for u in units:
            rows, start = seen[start : start + u.rows], start + u.rows
            if not self._reduces(u):
                continue
            rows = rows.to(hidden.device)
            if spec.encoder == "fixed":
                received, keys = fixed_received(layer, rows[0])
            else:
                received, keys = qwen_received(tower, layer, rows, u.shape, windows=spec.encoder == "qwen2_5_vl")
            scores, cell_keys = _cell_scores(u, received, keys)
            self._zip(u.cells, scores, cell_keys, ctx.hidden[u.sample], hidden[u.sample], keep[u.sample])
        return Merge(keep, hidden)

    def _reduces(self, unit: _Unit) -> bool:
        return unit.how != "whole" and unit.cells.numel() > self.tokens

    def _received_units(self, config, layouts, placed, keep, inputs: dict) -> list[_Unit]:
        """Every tower input of the prompt in encoding order (every sample's images, then every sample's videos: the
        one tower encodes both); drops the row newlines of the crop grids reduced (in ``keep``)."""
        spec = get_family(config)
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(inputs.get("image_sizes", [])).tolist()]
        found, image = {"image": [], "video": []}, 0  # image: the images begun so far (LLaVA-OneVision's sizes)
        for b, (layout, grids) in enumerate(zip(layouts, placed)):
            for i, p in enumerate(grids):
                kind = "image" if i < len(layout.images) else "video"
                image += int(kind == "image" and not p.grid.newline)  # a base crop or a whole image begins one
                cells = p.cells.flatten().to(keep.device)
                parts = _grid_units(config, spec, p.grid, kind, sizes[image - 1] if _downscaled(p.grid) else None)
                units = [replace(u, sample=b, cells=cells[u.cells]) for u in parts]
                found[kind].extend(units)
                if p.newlines is not None and any(self._reduces(u) for u in units):
                    keep[b, p.newlines.flatten().to(keep.device)] = False  # as the reference: no newlines left
        return found["image"] + found["video"]

    def _zip(self, cells, attention, keys, values, out, keep) -> None:
        """One tower input: ``cells`` ``(n,)`` sequence positions of its tokens in grid order; ``attention``
        ``(n,)`` and ``keys`` ``(n, hd)`` of those tokens; ``values`` ``(T, D)`` the decoder inputs; writes the
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


def _downscaled(grid) -> bool:
    """A crop grid the model resized after unpadding (LLaVA-OneVision's ``anyres_max``): row newlines, no tiling."""
    return grid.tiling is None and grid.newline > 0


def _grid_units(config, spec, grid, kind: str, size) -> list[_Unit]:
    """The tower inputs behind one grid as :class:`_Unit` with ``cells`` local to the grid (``sample`` unset);
    ``size``: the image's ``(height, width)``, for a downscaled crop grid (how many crops were encoded)."""
    n = grid.rows * grid.cols
    if spec.encoder != "fixed":  # Qwen: one unit per temporal slice, m x m patch rows per token
        m = int(config.vision_config.spatial_merge_size)
        shape = (grid.rows * m, grid.cols * m)
        return [_Unit(0, torch.arange(f * n, (f + 1) * n), n * m * m, "merge", shape=shape) for f in range(grid.frames)]
    if kind == "video" and spec.layout.video.resized:
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        return [_Unit(0, torch.arange(f * n, (f + 1) * n), 1, "resize", shape=(side, grid.rows))
                for f in range(grid.frames)]  # fmt: skip
    if _downscaled(grid):
        tile = int(config.vision_config.image_size)
        rows, cols = best_resolution(*size, config.image_grid_pinpoints)
        return [_Unit(0, torch.arange(n), (rows // tile) * (cols // tile), "whole")]
    return [_Unit(0, local, 1, "pick", patch=patch) for local, patch in tower_units(grid)]


def _cell_scores(unit: _Unit, received: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit's tokens' ``(scores (n,), keys (n, hd))`` from its patches' ``received`` ``(S,)`` and ``keys``
    ``(S, hd)``, as the model makes the tokens of the patches (:class:`_Unit`)."""
    if unit.how == "pick":
        patch = unit.patch.to(received.device)
        return received[patch], keys[patch]
    n = unit.cells.numel()
    if unit.how == "merge":
        return received.view(n, -1).mean(1), keys.view(n, -1, keys.shape[-1]).mean(1)
    side, out = unit.shape  # "resize": the frame's map, bilinearly resized as the model resizes its features
    maps = torch.cat([received[:, None], keys.float()], dim=1).T.reshape(1, -1, side, side)
    cells = nn.functional.interpolate(maps, size=(out, out), mode="bilinear")[0].flatten(1).T  # (n, 1 + hd)
    return cells[:, 0], cells[:, 1:]


def received_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """The softmax attention each key receives, mean over heads and queries: ``(S,)`` float32, summing to 1.

    Args:
        q, k: ``(H, S, hd)`` one tower input's queries and keys (rotary applied where the tower uses it); the
            ``S x S`` probabilities are computed in blocks of queries (:data:`CHUNK` at most at once).
        scaling: the attention's scale (``head_dim ** -0.5``).
    """
    heads, length, _ = q.shape
    step = max(1, CHUNK // (heads * length))
    total = torch.zeros(length, dtype=torch.float32, device=q.device)
    for start in range(0, length, step):
        scores = torch.matmul(q[:, start : start + step], k.transpose(1, 2)) * scaling  # (H, chunk, S)
        total += torch.softmax(scores, dim=-1, dtype=torch.float32).sum((0, 1))
    return total / (heads * length)


def received_attention_flops(width: int, length: int) -> int:
    """Matmul FLOPs of scoring one tower input of ``length`` patches of ``width`` (all heads): the query and key
    projections of every patch and ``q kᵀ`` over all of them."""
    return 4 * length * width * width + 2 * length * length * width


def fixed_received(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(received (S,), keys (S, hd))`` of one tower input ``hidden`` ``(S, D)`` (what ``layer`` received) in a
    fixed-resolution encoder layer without class token (SigLIP: ``layer_norm1``, ``self_attn`` with ``q_proj``,
    ``k_proj``, ``num_heads``, ``head_dim``, ``scale``); keys: ``k_proj``, mean over heads."""
    attn = layer.self_attn
    length = hidden.shape[0]
    normed = layer.layer_norm1(hidden)
    q = attn.q_proj(normed).view(length, attn.num_heads, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(normed).view(length, attn.num_heads, attn.head_dim).transpose(0, 1)
    return received_attention(q, k, attn.scale), k.mean(0)


def qwen_received(
    tower: nn.Module, block: nn.Module, hidden: torch.Tensor, shape: tuple[int, int], windows: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(received (S,), keys (S, hd))`` of one slice of ``shape = (h, w)`` patches in a Qwen ViT ``block``, in the
    processor's patch order (each decoder token's ``m x m`` patches consecutive).

    Args:
        tower: the ViT (its ``rotary_pos_emb``, ``spatial_merge_size``; Qwen2.5-VL: ``window_size``, ``patch_size``).
        hidden: ``(S, D)`` what ``block`` received for the slice, ``S = h·w``, in the order the blocks run it
            (``windows``: Qwen2.5-VL's window order of the merged tokens, undone here).
    """
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    length, width = hidden.shape
    m = tower.spatial_merge_size
    grid = torch.tensor([[1, *shape]])
    if windows:
        order = get_vision_window_index(grid, m, tower.window_size, tower.patch_size)[0]
        hidden = hidden.view(-1, m * m, width)[torch.argsort(order).to(hidden.device)].reshape(length, width)
    cos, sin = tower.rotary_pos_emb(hidden, get_vision_position_ids(grid, m).to(hidden.device))
    attn = block.attn
    normed = block.norm1(hidden)
    weight, bias = attn.qkv.weight, attn.qkv.bias  # rows: q, k, v (``width`` each); v is not needed
    q, k = (
        nn.functional.linear(normed, weight[part], None if bias is None else bias[part]).view(
            length, attn.num_heads, -1
        )
        for part in (slice(0, width), slice(width, 2 * width))
    )
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, S, hd)
    return received_attention(q, k, attn.scaling), k.mean(0)
