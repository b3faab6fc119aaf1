"""PyramidDrop: several stages; at each, keep a smaller share of the vision tokens, ranked by that layer's attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import last_token_attention
from .base import Reduction, StageContext, check_stage_layers, scaled_layers
from .ranking import check_keep, keep_top_vision, kept_count

#: the paper's stages for a 32-layer decoder, scaled to ``L`` when ``layers`` is not given
REFERENCE_LAYERS = (8, 16, 24)


@dataclass(frozen=True)
class PyramidDrop(Reduction):
    """At each stage layer ``layers[s]`` keep ``ceil(keep[s] · V_b)`` of sample ``b``'s original ``V_b`` vision tokens,
    the ones the last prompt token attends to most in that layer (recomputed from the layer's own input norm, q/k
    projections and rotary embedding on the hidden states entering it; softmax, mean over heads); text is always
    kept. Positions stay the original ones (the reference re-numbers them contiguously; vtw keeps every in-decoder
    method on original positions, as FastV and VTW do).

    ``layers=None``: the paper's ``(8, 16, 24)`` of 32 layers scaled to ``L`` (``round(8L/32)`` ...). ``keep``: one
    share per stage, non-increasing, each in ``(0, 1]``; stages that would keep everything are not installed.
    """

    name = "pdrop"
    free_parameter = "scale"
    layers: tuple[int, ...] | None = None
    keep: tuple[float, ...] = (0.5, 0.25, 0.125)

    def __post_init__(self):
        keep = tuple(self.keep) if isinstance(self.keep, (list, tuple)) else (self.keep,)
        keep = tuple(check_keep(k, "pdrop keep") for k in keep)
        if not keep or any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError(
                f"pdrop keep must be a non-empty non-increasing list of shares in (0, 1], got {self.keep!r}"
            )
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "layers", check_stage_layers(self.layers, keep, "pdrop"))

    def resolve(self, num_layers: int) -> PyramidDrop:
        layers = (
            self.layers if self.layers is not None else scaled_layers(REFERENCE_LAYERS, self.keep, num_layers, "pdrop")
        )
        if not all(0 <= k < num_layers for k in layers):
            raise ValueError(
                f"pdrop layers {list(layers)} are out of range: allowed 0..{num_layers - 1} (L={num_layers})"
            )
        return PyramidDrop(layers=layers, keep=self.keep)

    def _active(self) -> list[int]:
        """Indices of the stages that drop something (a share below the previous one)."""
        return [s for s, k in enumerate(self.keep) if k < (self.keep[s - 1] if s else 1.0)]

    def stages(self) -> tuple[int, ...]:
        if self.layers is None:
            raise ValueError("pdrop: resolve(num_layers) first (the default layers depend on L)")
        return tuple(self.layers[s] for s in self._active())

    def select(self, ctx: StageContext) -> torch.Tensor:
        share = self.keep[self._active()[ctx.stage]]
        scores = last_token_attention(
            ctx.module, ctx.hidden, ctx.position_embeddings, ctx.attention_mask, query=ctx.query
        )
        counts = [kept_count(share, int(v)) for v in ctx.input_vision.tolist()]
        return keep_top_vision(scores, ctx.vision, counts)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        raise NotImplementedError  # layer_tokens is overridden: the shares are of the original count

    def layer_tokens(self, num_layers: int, vision: int, text: int, layout=None) -> list[tuple[int, int]]:
        resolved = self.resolve(num_layers)
        out, current = [], vision
        for layer in range(num_layers):
            for s in resolved._active():
                if resolved.layers[s] == layer:
                    current = kept_count(resolved.keep[s], vision)
            out.append((current, text))
        return out

    def budget_candidates(self, num_layers: int) -> list[PyramidDrop]:
        """The keep shares scaled by a common factor ``s`` (capped at 1): ``s`` from 0.01 up to where every share is
        1, on a geometric grid of 200 steps."""
        top = 1.0 / min(self.keep)
        scales = [0.01 * (top / 0.01) ** (i / 199) for i in range(200)]
        out = []
        for sc in scales:
            keep = tuple(min(1.0, round(k * sc, 6)) for k in self.keep)
            if all(k > 0 for k in keep):
                out.append(PyramidDrop(layers=self.layers, keep=keep))
        return out

    def scored_inputs(self, num_layers: int) -> tuple[int, ...]:
        return tuple(k - 1 for k in self.resolve(num_layers).stages())

    @property
    def label(self) -> str:
        layers = "auto" if self.layers is None else ",".join(map(str, self.layers))
        return f"pdrop L={layers} keep={','.join(f'{k:.3g}' for k in self.keep)}"
