"""DyCoke's temporal token merging (TTM): per video, in windows of consecutive frames, the tokens of a later frame
that repeat the frame it is compared with (same grid cell, cosine similarity of the projected features) are dropped,
before the decoder. DyCoke's second stage (dynamic KV-cache pruning while decoding) is not part of it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..families import get_family
from .base import BeforeDecoder, StageContext, check_int
from .ranking import KEEP_GRID, check_keep, kept_count

#: the default ``keep``: ``1/4 + 3/4 · 0.3``, the share of a video the reference keeps with its default pruning rate
#: ``K = 0.7`` (``dycoke_k``): each window of four frames keeps its first frame whole and 30 % of the three others
DEFAULT_KEEP = 0.475


def compared_frame(frame: int, window: int) -> int | None:
    """The frame that ``frame`` is compared with: ``None`` for the first frame of each window (kept whole), else the
    frame ``lowbit(o)`` earlier in the same window, ``o`` the offset in the window (``o & -o``). Windows of four (the
    reference): offset 1 and 2 against 0, offset 3 against 2."""
    offset = frame % window
    return None if offset == 0 else frame - (offset & -offset)


@dataclass(frozen=True)
class DyCoke(BeforeDecoder):
    """Temporal token merging of each video (a grid of several frames; a Qwen frame is one temporal patch of two
    frames). Frames go in windows of ``window`` consecutive frames (the last one may be shorter); the first frame
    of each window is kept whole; each other frame is compared cell by cell (same spatial position) with an
    earlier frame of its window (:func:`compared_frame`: with four frames, frames 1 and 2 against frame 0 and frame 3
    against frame 2, as the reference pairs them), on the original tokens of both. A compared frame's tokens most
    similar to their counterpart are dropped (nothing is merged into the kept ones, as the reference does):

    * ``keep`` (the free parameter of ``vtw.budget``): ``ceil(keep · F · n)`` of a video's ``F · n`` grid cells are
      kept, exactly: every window's first frame, and the rest shared evenly by the compared frames (the earlier
      ones one more where it does not divide), each keeping its cells least similar to their counterpart (ties: the
      earlier cell). At least the first frames stay: a smaller ``keep`` keeps those only.
    * ``threshold``: every compared cell whose cosine similarity is above it is dropped: the counts depend on the
      data (:attr:`counts_depend_on_data`); the declared (expected) count is the whole video, an upper bound of the
      realized one (``handle.last_layer_tokens``).

    Give one of the two; neither: ``keep`` = :data:`DEFAULT_KEEP` (the reference's pruning rate ``K = 0.7`` on the
    three later frames of a window of four). ``keep=1``, ``threshold >= 1`` or ``window=1`` change nothing, so
    nothing is installed. Images, text, class tokens (Video-LLaVA's per frame) and trailing newlines (OneVision's
    per video) stay. Kept tokens keep their positions and their order, as every vtw method.

    Similarities are computed in float32 on each sample's own tokens, one ``D``-wide dot product of unit vectors
    per compared cell, the only FLOPs the method adds (:meth:`scoring_flops`). Refused on families without video.

    Deviations from the reference code (``dycole_ttm``: LLaVA-OneVision's pooled frames, windows of four, batch of one):

    * its second pass runs over ``range(0, F - 4, 4)``, so the last full window's third frame is never compared
      (frame 30 of 32 stays whole), and its pairs ``range(0, F - 1, 2)`` drop an odd count's last frame entirely;
      here every window, the last and a partial one included, follows the same rule, and no frame is lost whole.
    * counts: it keeps ``int((1 - K) · n)`` cells of every compared frame; here ``keep`` is the video's share
      (exact, from the layout) shared evenly by the compared frames. ``threshold`` is not in the reference code.
    * it puts a compared frame's kept tokens in order of similarity and renumbers positions; here they keep their
      order and positions. ``window`` other than 4 generalizes its pairing (:func:`compared_frame`).
    * its second stage, decode-time KV-cache pruning by the newest token's attention, is not implemented.
    """

    name = "dycoke"
    free_parameter = "keep"
    keep: float | None = None
    threshold: float | None = None
    window: int = 4

    def __post_init__(self):
        check_int(self.window, "dycoke window", minimum=1)
        if self.keep is not None and self.threshold is not None:
            raise ValueError(
                f"dycoke takes keep or threshold, not both: got keep={self.keep!r}, threshold={self.threshold!r}"
            )
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1 <= t <= 1:
                raise ValueError(f"dycoke threshold must be a cosine similarity in [-1, 1], got {t!r}")
            object.__setattr__(self, "threshold", float(t))
        else:
            keep = DEFAULT_KEEP if self.keep is None else self.keep
            object.__setattr__(self, "keep", check_keep(keep, "dycoke keep"))

    @property
    def counts_depend_on_data(self) -> bool:
        """Whether the realized counts depend on the data: with ``threshold`` (with ``keep`` they are exact)."""
        return self.threshold is not None

    def stages(self) -> tuple[int, ...]:
        idle = self.window == 1 or self.keep == 1 or (self.threshold is not None and self.threshold >= 1)
        return () if idle else (0,)

    @property
    def label(self) -> str:
        out = f"dycoke keep={self.keep:.3g}" if self.threshold is None else f"dycoke threshold={self.threshold:.3g}"
        return out if self.window == 4 else f"{out} window={self.window}"

    def budget_candidates(self, num_layers: int) -> list[DyCoke]:
        """``keep`` of ``0.005 .. 1`` (steps of 0.005), least compute first, the window as it is."""
        return [replace(self, keep=k, threshold=None) for k in KEEP_GRID]

    def check_supported(self, config, *, video: bool = False) -> None:
        spec = get_family(config)
        if not spec.takes_video:
            raise ValueError(
                f"dycoke cannot act on {spec.display}: it merges the frames of videos, and {spec.display} takes no "
                "video"
            )

    # ------------------------------------------------------------------ counts
    def _compared(self, frames: int) -> list[tuple[int, int]]:
        """``(frame, compared frame)`` of every compared frame of a video of ``frames`` frames, in time order."""
        pairs = [(f, compared_frame(f, self.window)) for f in range(frames)]
        return [(f, r) for f, r in pairs if r is not None]

    def frame_counts(self, frames: int, cells: int) -> list[int] | None:
        """With ``keep``: the cells each compared frame of a video of ``frames`` frames of ``cells`` cells keeps (time
        order); ``None`` where the video loses nothing (or with ``threshold``: it depends on the data)."""
        compared = len(self._compared(frames))
        if self.threshold is not None or not compared or not self.stages():
            return None
        first = (frames - compared) * cells
        room = min(max(kept_count(self.keep, frames * cells) - first, 0), compared * cells)
        if room == compared * cells:
            return None
        base, extra = divmod(room, compared)
        return [base + (i < extra) for i in range(compared)]

    def _reduces(self, grid) -> bool:
        """Whether the method looks at ``grid`` (a video of several frames whose compared frames may lose cells)."""
        if grid.frames < 2 or not self.stages() or not self._compared(grid.frames):
            return False
        return self.threshold is not None or self.frame_counts(grid.frames, grid.rows * grid.cols) is not None

    def grid_tokens(self, grid) -> int:
        counts = self.frame_counts(grid.frames, grid.rows * grid.cols) if grid.frames > 1 else None
        if counts is None:  # nothing lost, or threshold: the whole video is the declared (upper-bound) count
            return grid.tokens
        return grid.tokens - len(counts) * grid.rows * grid.cols + sum(counts)

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """``2 · D`` per compared cell of each video the method looks at (``D``: the decoder's hidden size): one dot
        product of two unit vectors. The normalisation, ranking and comparisons are no matmuls and are not counted.
        ``tokens`` (per-layer counts) is not needed; ``layout`` is (``ValueError`` without it)."""
        if layout is None:
            raise ValueError(f"{self.label}: its scoring FLOPs depend on each video's grid; give the sample's layout")
        hidden = int(config.get_text_config().hidden_size)
        grids = [g for g in layout.videos if self._reduces(g)]
        return sum(2 * len(self._compared(g.frames)) * g.rows * g.cols * hidden for g in grids)

    # ------------------------------------------------------------------ the choice
    def select(self, ctx: StageContext) -> torch.Tensor:
        layouts, placed = self.placed_grids(ctx)
        keep = torch.ones_like(ctx.vision)
        for b, (layout, grids) in enumerate(zip(layouts, placed)):
            for p in grids[len(layout.images) :]:  # the videos
                if not self._reduces(p.grid):
                    continue
                cells = p.cells.to(ctx.hidden.device).flatten(1)  # (F, n)
                dropped = self.dropped(ctx.hidden[b, cells])
                keep[b, cells[dropped]] = False
        return keep

    def similarities(self, frames: torch.Tensor) -> torch.Tensor:
        """``(C, n)`` float32: the cosine similarity of each cell of each compared frame with the same cell of the
        frame it is compared with (time order), clamped to ``[-1, 1]``. ``frames``: ``(F, n, D)`` one video's
        tokens."""
        pairs = self._compared(frames.shape[0])
        unit = nn.functional.normalize(frames.float(), dim=-1)
        later = unit[[f for f, _ in pairs]]  # (C, n, D)
        earlier = unit[[r for _, r in pairs]]
        return (later.unsqueeze(-2) @ earlier.unsqueeze(-1)).flatten(1).clamp(-1, 1)  # (C, n): C·n dot products

    def dropped(self, frames: torch.Tensor) -> torch.Tensor:
        """``(F, n)`` bool: the cells of one video ``frames`` ``(F, n, D)`` the method drops."""
        count, cells = frames.shape[0], frames.shape[1]
        pairs = self._compared(count)
        similarity = self.similarities(frames)
        if self.threshold is not None:
            drop = similarity > self.threshold
        else:
            kept = torch.tensor(self.frame_counts(count, cells), device=frames.device)
            order = torch.sort(similarity, dim=1, stable=True).indices  # least similar first; ties: the earlier cell
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(cells, device=frames.device).expand_as(order)
            )
            drop = rank >= kept[:, None]
        out = torch.zeros(count, cells, dtype=torch.bool, device=frames.device)
        out[[f for f, _ in pairs]] = drop
        return out
