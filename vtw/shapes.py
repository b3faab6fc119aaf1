"""The shapes vision tokens take, as plain data: what the layouts (:mod:`vtw.layouts`), the grids of a batch
(:mod:`vtw.grids`), the workload of a sample (:mod:`vtw.workload`) and the FLOPs model share. Nothing here knows a
family: this module imports no other of vtw's, so the family registry can hold layout objects built on it.

:class:`Grid` / :class:`SampleLayout`: where an image's or video's tokens lie in the decoder's sequence;
:func:`best_resolution` / :func:`unpadded`: the arithmetic of LLaVA-NeXT's tiling; :class:`VisionWorkload` /
:class:`ImageLayout`: what runs through the vision encoder for a sample or one image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Grid:
    """One image's (or crop grid's, or video's) tokens in sequence order: ``frames`` times [``lead`` tokens, then
    ``rows`` rows of ``cols`` grid tokens each followed by ``newline`` tokens], then ``trail`` tokens.

    ``lead`` (a class token), ``newline`` and ``trail`` tokens are not grid cells: grid methods keep them as they are.
    ``tiling``: an anyres crop grid's ``(crop rows, crop cols, side)``: it was cut from that many ``side x side``
    crops, then the padding was removed symmetrically (:func:`unpadded`); ``None`` for a grid of one encoder input
    per frame (or a downscaled one, whose cells are no crop's patches).
    """

    rows: int
    cols: int
    frames: int = 1
    lead: int = 0
    newline: int = 0
    trail: int = 0
    tiling: tuple[int, int, int] | None = None

    @property
    def tokens(self) -> int:
        """Decoder tokens of this grid."""
        return self.frames * (self.lead + self.rows * (self.cols + self.newline)) + self.trail

    def pooled(self, stride: int, stride_cols: int | None = None) -> Grid:
        """The grid after pooling each frame over windows of ``stride`` rows and ``stride_cols`` (default
        ``stride``) columns, edge windows partial: ``ceil(rows / stride) x ceil(cols / stride_cols)`` cells, one
        newline per pooled row, ``lead`` and ``trail`` unchanged."""
        cols = stride if stride_cols is None else stride_cols
        return replace(self, rows=math.ceil(self.rows / stride), cols=math.ceil(self.cols / cols), tiling=None)

    def cell_index(self) -> torch.Tensor:
        """``(frames, rows, cols)`` long: each cell's offset from the grid's first token."""
        frame = self.lead + self.rows * (self.cols + self.newline)
        f = torch.arange(self.frames)[:, None, None] * frame
        r = torch.arange(self.rows)[None, :, None] * (self.cols + self.newline)
        c = torch.arange(self.cols)[None, None, :]
        return f + self.lead + r + c


@dataclass(frozen=True)
class SampleLayout:
    """The grids of one sample's images and of its videos, each in sequence order."""

    images: tuple[Grid, ...] = ()
    videos: tuple[Grid, ...] = ()

    @property
    def grids(self) -> tuple[Grid, ...]:
        return self.images + self.videos

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.grids)


# ------------------------------------------------------------------------------------------ LLaVA-NeXT tiling
def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` that keeps the most image pixels, ties broken by the least padding (LLaVA-NeXT's rule)."""
    best, best_effective, best_wasted = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise ValueError("config has no image_grid_pinpoints")
    return best


def unpadded(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """Feature ``(rows, cols)`` left after removing the padding the anyres resize added (``unpad_image``)."""
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new_rows) // 2), cols
    new_cols = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new_cols) // 2)


def has_class_token(config) -> bool:
    """Whether the family's (fixed-resolution) vision tower puts a class token first (CLIP does, SigLIP does not)."""
    return getattr(config.vision_config, "model_type", None) == "clip_vision_model"


@dataclass(frozen=True)
class VisionWorkload:
    """The vision-encoder work of one sample.

    Attributes:
        image_inputs: fixed-resolution encoder passes for images: one per image (LLaVA-1.5, Video-LLaVA) or one per
            crop (LLaVA-NeXT / -OneVision / -NeXT-Video anyres tiling; ``pixel_values`` rows actually used).
        video_frames: frames of videos through a fixed-resolution encoder.
        videos: number of videos (LLaVA-OneVision adds one newline token per video).
        grids: Qwen families: ``(t, h, w)`` in patches of every image and video, as in ``image_grid_thw``.
    """

    image_inputs: int = 0
    video_frames: int = 0
    videos: int = 0
    grids: tuple[tuple[int, int, int], ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return self.image_inputs == 0 and self.video_frames == 0 and not self.grids


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``; ``ValueError`` naming it otherwise (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ImageLayout:
    """One image of ``image_size`` (H, W) pixels: its decoder tokens and its encoder workload."""

    image_size: tuple[int, int]
    vision_tokens: int
    workload: VisionWorkload
    note: str  # how the encoder sees it, e.g. "5 crops of 336x336"
