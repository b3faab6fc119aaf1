"""What one sample sends through the vision encoder, and how many decoder tokens that makes.

A :class:`VisionWorkload` describes the encoder side of one sample: fixed-resolution encoder passes (images, or the
crops of LLaVA-NeXT-style "anyres" tiling), video frames, and for the Qwen families the ``(t, h, w)`` patch grid of
every image and video (the rows of ``image_grid_thw`` / ``video_grid_thw``).

* :func:`image_layout` computes the workload and the decoder's vision-token count of one image of a given pixel size,
  with the same arithmetic as the pinned transformers' processors (anyres tiling and unpadding, OneVision's
  ``anyres_max_N`` downscaling, Qwen's ``smart_resize``). The planning command uses it for its default image.
* :func:`workload_from_inputs` reads the workload of one sample from the tensors a processor produced
  (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...): what an evaluation logs per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..grids import best_resolution, unpadded
from .arch import Architecture, architecture

#: Qwen2-VL / Qwen2.5-VL image processor defaults (``preprocessor_config.json`` of the 7B checkpoints).
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280

#: The planning command's default image: one 640 x 480 (W x H) photo, the size of a typical COCO / VQAv2 image.
DEFAULT_IMAGE_SIZE = (480, 640)  # (height, width)


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


@dataclass(frozen=True)
class ImageLayout:
    """One image of ``image_size`` (H, W) pixels: its decoder tokens and its encoder workload."""

    image_size: tuple[int, int]
    vision_tokens: int
    workload: VisionWorkload
    note: str  # how the encoder sees it, e.g. "5 crops of 336x336"


def _anyres_layout(arch: Architecture, height: int, width: int) -> ImageLayout:
    tile = arch.vision.image_size
    side = tile // arch.vision.patch
    ph, pw = best_resolution(height, width, arch.image_grid_pinpoints)
    grid_h, grid_w = ph // tile, pw // tile
    crops = 1 + grid_h * grid_w
    rows, cols = unpadded(height, width, grid_h * side, grid_w * side)
    if arch.vision_aspect_ratio is not None:  # LLaVA-OneVision: bilinear downscale beyond N crops' worth
        max_crops = int(arch.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    base = arch.tokens.image_projector_tokens
    tokens = base + rows * cols + rows  # base crop + unpadded grid + one newline per row
    return ImageLayout((height, width), tokens, VisionWorkload(image_inputs=crops), f"{crops} crops of {tile}x{tile}")


def _qwen_layout(arch: Architecture, height: int, width: int) -> ImageLayout:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = arch.vision.patch * arch.vision.spatial_merge
    h, w = smart_resize(height, width, factor=factor, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    grid = (1, h // arch.vision.patch, w // arch.vision.patch)
    tokens = grid[1] * grid[2] // arch.vision.spatial_merge**2
    return ImageLayout(
        (height, width), tokens, VisionWorkload(grids=(grid,)), f"resized to {w}x{h}, {grid[1]}x{grid[2]} patches"
    )


def image_layout(config, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> ImageLayout:
    """Decoder vision tokens and encoder workload of one image of ``image_size = (height, width)`` pixels.

    LLaVA-1.5 / Video-LLaVA resize every image to the encoder's fixed input; the anyres families tile it (base crop
    plus the best pinpoint grid); the Qwen families resize it to multiples of ``patch * merge`` pixels
    (``smart_resize`` with the 7B checkpoints' ``min_pixels`` / ``max_pixels``).
    """
    if (
        not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be (height, width) in pixels, two positive ints; got {image_size!r}")
    arch = architecture(config)
    height, width = image_size
    if arch.is_qwen:
        return _qwen_layout(arch, height, width)
    if arch.anyres:
        return _anyres_layout(arch, height, width)
    size = arch.vision.image_size
    return ImageLayout(
        (height, width), arch.tokens.image_decoder_tokens, VisionWorkload(image_inputs=1), f"resized to {size}x{size}"
    )


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(t, "shape", ()))


def workload_from_inputs(
    config,
    *,
    pixel_values=None,
    image_sizes=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
) -> VisionWorkload:
    """The encoder workload of ONE sample, read from its processor outputs.

    Args:
        pixel_values: images of the sample. LLaVA-1.5 / Video-LLaVA: ``(images, C, H, W)``. Anyres families:
            ``(images, max_crops, C, H, W)`` (crop padding is discarded using ``image_sizes``; LLaVA-OneVision tiles
            a sample's image only when it is the sample's only image, as its processor's ``batch_num_images`` says)
            or ``(crops, C, H, W)``. Qwen: flattened patches (only ``image_grid_thw`` is read).
        image_sizes: anyres families: ``(images, 2)`` original (H, W) of each image.
        pixel_values_videos: ``(videos, frames, C, H, W)`` for the fixed-resolution families.
        image_grid_thw / video_grid_thw: Qwen families: ``(n, 3)`` patch grids.
    """
    arch = architecture(config)
    if arch.is_qwen:
        grids = []
        for g in (image_grid_thw, video_grid_thw):
            if g is not None:
                grids += [tuple(int(v) for v in row) for row in g.tolist()]
        return VisionWorkload(grids=tuple(grids))
    image_inputs = 0
    if pixel_values is not None:
        shape = _shape(pixel_values)
        if arch.anyres and len(shape) == 5:
            if image_sizes is None:
                raise ValueError(f"{arch.display}: image_sizes is needed to count the crops of 5-D pixel_values")
            sizes = [tuple(int(v) for v in s) for s in image_sizes.tolist()]
            if arch.spec.image_layout == "anyres_max" and len(sizes) > 1:
                image_inputs = len(sizes)  # several images in one sample: no tiling, one crop each
            else:
                tile = arch.vision.image_size
                image_inputs = sum(
                    1 + (ph // tile) * (pw // tile)
                    for ph, pw in (best_resolution(h, w, arch.image_grid_pinpoints) for h, w in sizes)
                )
        elif len(shape) == 4:
            image_inputs = shape[0]
        else:
            raise ValueError(f"{arch.display}: pixel_values of shape {shape} not understood")
    frames = videos = 0
    if pixel_values_videos is not None:
        shape = _shape(pixel_values_videos)
        if len(shape) != 5:
            raise ValueError(f"{arch.display}: pixel_values_videos must be (videos, frames, C, H, W), got {shape}")
        videos, frames = shape[0], shape[0] * shape[1]
    return VisionWorkload(image_inputs=image_inputs, video_frames=frames, videos=videos)
