"""Pooling: average each image's and each video frame's vision-token grid over ``stride x stride_cols`` windows,
before the decoder."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import BeforeDecoder, Merge, StageContext, check_int

#: the windows (rows, cols) the matched-compute search tries (``vtw.budget``), least compute first: squares and
#: one column wider (1x2 keeps half the tokens, 2x2 a quarter, 2x3 a sixth, ...)
WINDOWS: tuple[tuple[int, int], ...] = tuple(
    sorted(((s, s + d) for s in range(1, 33) for d in (0, 1)), key=lambda w: (-w[0] * w[1], -w[0]))
)


@dataclass(frozen=True)
class Pool(BeforeDecoder):
    """2-D average pooling of the projected vision features, per image (per crop grid of the anyres families, per
    ``t`` slice of a Qwen grid) and per video frame: each window of ``stride`` rows by ``stride_cols`` (default
    ``stride``) columns of grid cells (partial windows at the right and bottom edges) becomes one token, the mean
    of its cells, at the sequence position of the window's top-left cell. Positions are not renumbered: a pooled token keeps that cell's position ids (its ``(t, h, w)``
    M-RoPE position on Qwen, so the pooled grid spans the image's original extent) and the text keeps its own, as
    every in-decoder method here keeps the positions of what it keeps. Class tokens and the trailing newline of a
    video stay; of a grid's row newlines, those of rows starting a window (one per pooled row) stay.

    ``576 -> 144`` for LLaVA-1.5 is ``stride=2``; ``stride=1, stride_cols=2`` keeps half; ``stride=1`` is the full
    model (nothing is installed). The pooling is done after the projector, as LLaVA-OneVision pools its video
    frames. It takes no matmul, so it adds no FLOPs.
    """

    name = "pool"
    free_parameter = "stride"
    stride: int = 2
    stride_cols: int | None = None

    def __post_init__(self):
        check_int(self.stride, "pool stride", minimum=1)
        if self.stride_cols is not None:
            check_int(self.stride_cols, "pool stride_cols", minimum=1)

    @property
    def window(self) -> tuple[int, int]:
        """``(rows, cols)`` of a pooling window."""
        return self.stride, self.stride if self.stride_cols is None else self.stride_cols

    def stages(self) -> tuple[int, ...]:
        return () if self.window == (1, 1) else (0,)

    def grid_tokens(self, grid) -> int:
        return grid.pooled(*self.window).tokens

    @property
    def label(self) -> str:
        return "pool {}x{}".format(*self.window)

    def budget_candidates(self, num_layers: int) -> list[Pool]:
        return [replace(self, stride=r, stride_cols=None if r == c else c) for r, c in WINDOWS]

    def select(self, ctx: StageContext) -> Merge:
        _, placed = self.placed_grids(ctx)
        sr, sc = self.window
        keep = torch.ones_like(ctx.vision)  # text, class tokens, trailing newlines; cells and row newlines below
        hidden = ctx.hidden.clone()
        for b, grids in enumerate(placed):
            for p in grids:
                frames, rows, cols = p.cells.shape
                pr, pc = -(-rows // sr), -(-cols // sc)
                cells = p.cells.to(hidden.device)
                keep[b, cells.flatten()] = False
                window = (
                    torch.arange(frames, device=hidden.device)[:, None, None] * (pr * pc)
                    + (torch.arange(rows, device=hidden.device) // sr)[None, :, None] * pc
                    + (torch.arange(cols, device=hidden.device) // sc)[None, None, :]
                ).flatten()
                values = ctx.hidden[b, cells.flatten()].float()
                sums = torch.zeros(frames * pr * pc, values.shape[-1], device=hidden.device).index_add_(
                    0, window, values
                )
                counts = torch.bincount(window, minlength=frames * pr * pc).to(sums)
                corner = cells[:, ::sr, ::sc].flatten()  # each window's top-left cell, in window order
                hidden[b, corner] = (sums / counts[:, None]).to(hidden.dtype)
                keep[b, corner] = True
                if p.newlines is not None:
                    keep[b, p.newlines.to(hidden.device)] = False
                    keep[b, p.newlines[:, ::sr].flatten().to(hidden.device)] = True
        return Merge(keep, hidden)
