"""How each family lays its images and videos out, as the objects a :class:`vtw.families.FamilySpec` holds.

A :class:`Layout` answers every question whose answer depends on how a family's vision tokens lie: how many decoder
tokens an image or a video frame makes, what runs through the vision tower for a sample (and so how the tower's
FLOPs scale), how an image of a given size is tiled, what the processor's tensors say about a sample's encoder work,
and what a count alone leaves open. Its ``video`` (a :class:`VideoLayout`) answers the same for videos. Code
elsewhere calls these methods instead of branching on the family, so adding a family is one registry entry (and a
new class here only for a new way of laying tokens out).

=====================  ==================================================================================
:class:`Layout`        one fixed-size encoder input per image, resized (LLaVA-1.5, Video-LLaVA)
:class:`Anyres`        a base crop plus the crops of the best ``image_grid_pinpoints`` grid (LLaVA-NeXT(-Video))
:class:`AnyresMax`     :class:`Anyres` with ``anyres_max_N`` downscaling, no tiling for several images (OneVision)
:class:`QwenGrid`      the native-resolution patch grid of a Qwen ViT (Qwen2-VL, Qwen2.5-VL)
=====================  ==================================================================================

Videos: :class:`VideoLayout` (none), :class:`FramesVideo` (Video-LLaVA), :class:`PooledVideo` (LLaVA-NeXT-Video),
:class:`ResizedVideo` (LLaVA-OneVision), :class:`GridVideo` (Qwen). The arithmetic on the counts these give (matmul
FLOPs) lives in :mod:`vtw.flops`; the grids of a processed batch in :mod:`vtw.grids`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple

from .shapes import (
    Grid,
    ImageLayout,
    SampleLayout,
    VisionWorkload,
    best_resolution,
    check_count,
    has_class_token,
    unpadded,
)

#: Qwen2-VL / Qwen2.5-VL image processor defaults (``preprocessor_config.json`` of the 7B checkpoints).
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280


class TowerRuns(NamedTuple):
    """What one sample sends through the vision tower and the projector (:meth:`Layout.tower`).

    ``tokens`` through every block, attending within ``segments`` (an image, crop or frame; ``windows``: the window
    segments of the blocks without full attention, Qwen2.5-VL), ``patches`` through the patch embedding, ``passes``
    fixed-resolution inputs (a SigLIP pooling head runs once each), ``projector_rows`` rows through the projector.
    """

    tokens: int
    segments: list[int]
    windows: list[int] | None
    patches: int
    passes: int
    projector_rows: int


def _side(config) -> int:
    return int(config.vision_config.image_size) // int(config.vision_config.patch_size)


# ---------------------------------------------------------------------------------------------------- videos
@dataclass(frozen=True)
class VideoLayout:
    """How a family's videos reach the decoder; this base: the family takes no video."""

    #: the family's display name, for messages (set by :class:`vtw.families.FamilySpec`)
    family: str = field(default="", compare=False, repr=False)
    name: ClassVar[str | None] = None
    #: frames are pooled before the projector: their tokens are no tower patches (LLaVA-NeXT-Video)
    pooled: ClassVar[bool] = False
    #: frames are projected, then resized: a frame's tokens are no tower patches (LLaVA-OneVision)
    resized: ClassVar[bool] = False

    @property
    def takes_video(self) -> bool:
        return self.name is not None

    def frame_tokens(self, config, side: int, tower_tokens: int, selected: int) -> tuple[int | None, int | None, int]:
        """A fixed-resolution tower's (projector rows per frame, decoder tokens per frame, decoder tokens added once
        per video); ``side``: patches a side, ``tower_tokens``: the tower's sequence per input, ``selected``: the
        rows ``vision_feature_select_strategy`` keeps. ``(None, None, 0)``: no video."""
        return None, None, 0

    def frame_grid(self, config, frames: int):
        """The :class:`vtw.grids.Grid` of one video of ``frames`` frames of a fixed-resolution family."""
        raise ValueError(f"{self.family} takes no video")


@dataclass(frozen=True)
class FramesVideo(VideoLayout):
    """Every frame through the tower, every token kept, class token included (Video-LLaVA)."""

    name: ClassVar[str] = "frames"

    def frame_tokens(self, config, side, tower_tokens, selected):
        return tower_tokens, tower_tokens, 0

    def frame_grid(self, config, frames):

        side = _side(config)
        return Grid(side, side, frames=frames, lead=1 if has_class_token(config) else 0)


@dataclass(frozen=True)
class PooledVideo(VideoLayout):
    """Frame features spatially pooled by ``spatial_pool_stride`` before the projector (LLaVA-NeXT-Video)."""

    name: ClassVar[str] = "pooled"
    pooled: ClassVar[bool] = True

    def frame_tokens(self, config, side, tower_tokens, selected):
        mode = getattr(config, "spatial_pool_mode", "average")
        if mode not in ("average", "max"):
            raise ValueError(f"{self.family} spatial_pool_mode={mode!r} is not covered; covered: average, max")
        pooled = (side // int(config.spatial_pool_stride)) ** 2  # Avg/MaxPool2d, kernel = stride, no padding
        return pooled, pooled, 0

    def frame_grid(self, config, frames):

        n = _side(config) // int(config.spatial_pool_stride)
        return Grid(n, n, frames=frames)


@dataclass(frozen=True)
class ResizedVideo(VideoLayout):
    """Frames projected, then bilinearly resized to ``ceil(side / 2)`` squared, one newline per video (OneVision)."""

    name: ClassVar[str] = "resized"
    resized: ClassVar[bool] = True

    def frame_tokens(self, config, side, tower_tokens, selected):
        return selected, math.ceil(side / 2) ** 2, 1

    def frame_grid(self, config, frames):

        n = math.ceil(_side(config) / 2)
        return Grid(n, n, frames=frames, trail=1)


@dataclass(frozen=True)
class GridVideo(VideoLayout):
    """The 3-D patch grid of a Qwen ViT (``video_grid_thw``): a video is counted like an image of ``t`` slices."""

    name: ClassVar[str] = "grid"

    def frame_grid(self, config, frames):
        raise ValueError(f"{self.family}: a video's grid follows video_grid_thw; use qwen_grid")


# ---------------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class Layout:
    """One fixed-size encoder input per image, resized (LLaVA-1.5, Video-LLaVA); the base of every layout.

    Methods take the :class:`vtw.flops.Architecture` (``arch``) where they need the tower's dimensions.
    """

    video: VideoLayout = VideoLayout()
    #: the family's display name, for messages (set by :class:`vtw.families.FamilySpec`)
    family: str = field(default="", compare=False, repr=False)
    name: ClassVar[str] = "single"
    #: LLaVA-NeXT-style tiling: the number of crops (and tokens) of an image depends on its size
    tiled: ClassVar[bool] = False
    #: a Qwen ViT over a native-resolution patch grid (token counts follow ``image_grid_thw``)
    native_grid: ClassVar[bool] = False

    # -------------------------------------------------------------------------------- what the config gives
    def image_decoder_tokens(self, selected: int) -> int | None:
        """Decoder tokens per image given the rows one encoder input keeps (``None``: they depend on its size)."""
        return selected

    def aspect_ratio(self, config) -> str | None:
        """OneVision's ``vision_aspect_ratio`` (``"anyres_max_N"``), else ``None``."""
        return None

    def video_frame_tokens(self, arch) -> int | None:
        """Decoder tokens per video frame through a fixed-resolution tower (``None``: not such a family)."""
        return arch.tokens.video_decoder_tokens

    # ------------------------------------------------------------------------------------ a sample's work
    def workload(self, arch, sample):
        """The :class:`vtw.flops.VisionWorkload` of a :class:`vtw.flops.SampleCounts`, filled in from its vision
        tokens where they determine it; ``ValueError`` where they do not or where it cannot have made them."""

        frames = check_count(sample.video_frames, "video_frames")
        if sample.vision_grids:
            raise ValueError(f"{arch.display} has a fixed-resolution encoder: vision_grids is for the Qwen families")
        images = sample.vision_inputs
        if images is None:
            images = self._images_of(arch, sample.vision_tokens, frames)
        images = check_count(images, "vision_inputs")
        work = VisionWorkload(image_inputs=images, video_frames=frames, videos=sample.videos or 0)
        if work.video_frames and arch.tokens.video_projector_tokens is None:
            raise ValueError(f"{arch.display} takes no video: video_frames must be 0, got {work.video_frames}")
        self._check_tokens(arch, work, sample.vision_tokens)
        return work

    def _images_of(self, arch, vision_tokens: int, frames: int) -> int:
        rest = vision_tokens - frames * (arch.tokens.video_decoder_tokens or 0)
        per = arch.tokens.image_decoder_tokens or 1
        if rest % per:
            raise ValueError(
                f"{arch.display}: vision_tokens={vision_tokens} is not a whole number of images of {per} tokens "
                f"(plus {frames} video frame(s)); pass vision_inputs explicitly"
            )
        return rest // per

    def _check_tokens(self, arch, work, vision_tokens: int) -> None:
        made = work.image_inputs * arch.tokens.image_decoder_tokens + work.video_frames * (
            arch.tokens.video_decoder_tokens or 0
        )
        if made != vision_tokens:
            raise ValueError(
                f"{arch.display}: {work.image_inputs} image(s) and {work.video_frames} video frame(s) give {made} "
                f"vision tokens, not vision_tokens={vision_tokens}"
            )

    def tower(self, arch, work) -> TowerRuns:
        """What a workload sends through the tower: one pass of ``tokens_per_input`` tokens per image input (image
        or crop) and per video frame."""
        v, rules = arch.vision, arch.tokens
        passes, seq = work.image_inputs + work.video_frames, v.tokens_per_input
        rows = work.image_inputs * rules.image_projector_tokens + work.video_frames * (
            rules.video_projector_tokens or 0
        )
        return TowerRuns(passes * seq, [seq] * passes, None, passes * v.patches_per_input, passes, rows)

    def read_workload(self, arch, *, pixel_values=None, image_sizes=None, pixel_values_videos=None, **_):
        """The workload of ONE sample from its processor outputs (see :func:`vtw.flops.workload_from_inputs`)."""

        image_inputs = 0 if pixel_values is None else self._image_inputs(arch, _shape(pixel_values), image_sizes)
        frames = videos = 0
        if pixel_values_videos is not None:
            shape = _shape(pixel_values_videos)
            if len(shape) != 5:
                raise ValueError(f"{arch.display}: pixel_values_videos must be (videos, frames, C, H, W), got {shape}")
            videos, frames = shape[0], shape[0] * shape[1]
        return VisionWorkload(image_inputs=image_inputs, video_frames=frames, videos=videos)

    def _image_inputs(self, arch, shape: tuple[int, ...], image_sizes) -> int:
        if len(shape) == 4:
            return shape[0]
        raise ValueError(f"{arch.display}: pixel_values of shape {shape} not understood")

    # -------------------------------------------------------------------------------------- one image
    def image(self, arch, height: int, width: int):
        """The :class:`vtw.flops.ImageLayout` of one image of ``height x width`` pixels."""

        size = arch.vision.image_size
        return ImageLayout(
            (height, width),
            arch.tokens.image_decoder_tokens,
            VisionWorkload(image_inputs=1),
            f"resized to {size}x{size}",
        )

    def crop_grid(self, config) -> Grid:
        """One fixed-resolution encoder input (an image, or a base crop) after ``vision_feature_select_strategy``."""
        side = _side(config)
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            return Grid(side, side, lead=1 if has_class_token(config) else 0)
        if not has_class_token(config):
            raise ValueError(
                f"{self.family}: vision_feature_select_strategy='default' on a tower without a class token drops the "
                "first patch, so an image's tokens are not a grid"
            )
        return Grid(side, side)

    def image_grids(self, config, image_size: tuple[int, int] | None = None, tiled: bool = True) -> tuple[Grid, ...]:
        """The grids of one image of ``image_size = (height, width)`` pixels (``tiled``: OneVision tiles an image
        only when it is its sample's only image); here one grid, whatever the size."""
        return (self.crop_grid(config),)

    def image_sample(self, config, height: int, width: int):
        """The :class:`vtw.grids.SampleLayout` of a sample of one such image where counts cannot give it (anyres),
        else ``None`` (:func:`vtw.grids.counted_layout` derives it)."""
        return None

    def planned(self, arch, vision_tokens: int, image) -> tuple:
        """``(workload, note)`` assumed for ``vision_tokens > 0`` decoder tokens given alone (``image``: the
        planning command's default image, an :class:`vtw.flops.ImageLayout`)."""

        per = arch.tokens.image_decoder_tokens
        if vision_tokens % per:
            raise ValueError(
                f"{arch.display}: vision_tokens={vision_tokens} is not a whole number of {per}-token images"
            )
        work = VisionWorkload(image_inputs=vision_tokens // per)
        return work, f"{work.image_inputs} image(s) of {per} tokens"


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(t, "shape", ()))


@dataclass(frozen=True)
class Anyres(Layout):
    """A base crop plus the crops of the best ``image_grid_pinpoints`` grid, unpadded, one newline token per row
    (LLaVA-NeXT, LLaVA-NeXT-Video)."""

    name: ClassVar[str] = "anyres"
    tiled: ClassVar[bool] = True

    def image_grids(self, config, image_size=None, tiled=True):
        """The base crop's grid, then the unpadded crop grid (one newline per row) of the best pinpoint."""
        base = self.crop_grid(config)
        if image_size is None:
            raise ValueError(f"{self.family}: the grids of an anyres image depend on its size; give image_size")
        height, width = (int(v) for v in image_size)
        tile, side = int(config.vision_config.image_size), base.rows
        ph, pw = best_resolution(height, width, config.image_grid_pinpoints)
        rows, cols = unpadded(height, width, (ph // tile) * side, (pw // tile) * side)
        rows, cols, tiling = self._downscaled(config, rows, cols, side, (ph // tile, pw // tile, side))
        return base, Grid(rows, cols, newline=1, tiling=tiling)

    def _downscaled(self, config, rows: int, cols: int, side: int, tiling):
        return rows, cols, tiling

    def image_decoder_tokens(self, selected):
        return None

    def _images_of(self, arch, vision_tokens, frames):
        if vision_tokens - frames * (arch.tokens.video_decoder_tokens or 0):
            raise ValueError(
                f"{arch.display}: the number of vision-tower crops depends on the image size; pass "
                "vision_inputs=<crops run through the tower>, or get it from vtw.flops.image_layout"
            )
        return 0

    def _check_tokens(self, arch, work, vision_tokens):
        return  # tokens per crop depend on the image size: not checkable from counts

    def _image_inputs(self, arch, shape, image_sizes):
        if len(shape) != 5:
            return super()._image_inputs(arch, shape, image_sizes)
        if image_sizes is None:
            raise ValueError(f"{arch.display}: image_sizes is needed to count the crops of 5-D pixel_values")
        return self._crops(arch, [tuple(int(v) for v in s) for s in image_sizes.tolist()])

    def _crops(self, arch, sizes: list[tuple[int, int]]) -> int:

        tile = arch.vision.image_size
        return sum(
            1 + (ph // tile) * (pw // tile)
            for ph, pw in (best_resolution(h, w, arch.image_grid_pinpoints) for h, w in sizes)
        )

    def image(self, arch, height, width):

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
        tokens = arch.tokens.image_projector_tokens + rows * cols + rows  # base + unpadded grid + newline per row
        note = f"{crops} crops of {tile}x{tile}"
        return ImageLayout((height, width), tokens, VisionWorkload(image_inputs=crops), note)

    def image_sample(self, config, height, width):

        return SampleLayout(images=self.image_grids(config, (height, width)))

    def planned(self, arch, vision_tokens, image):
        h, w = image.image_size
        return (
            image.workload,
            f"{vision_tokens} decoder tokens (given); encoder work of one {w}x{h} image: {image.note}",
        )


@dataclass(frozen=True)
class AnyresMax(Anyres):
    """:class:`Anyres` plus LLaVA-OneVision's ``vision_aspect_ratio="anyres_max_N"`` downscale of large grids, and
    no tiling when a sample has several images."""

    name: ClassVar[str] = "anyres_max"

    def aspect_ratio(self, config):
        return getattr(config, "vision_aspect_ratio", None)

    def image_grids(self, config, image_size=None, tiled=True):
        if not tiled:
            return (replace(self.crop_grid(config), trail=1),)
        return super().image_grids(config, image_size, tiled)

    def _downscaled(self, config, rows, cols, side, tiling):
        """Beyond ``N`` crops' worth of cells, a bilinear downscale (its cells are no crop's patches)."""
        max_crops = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio), None
        return rows, cols, tiling

    def _crops(self, arch, sizes):
        if len(sizes) > 1:
            return len(sizes)  # several images in one sample: no tiling, one crop each
        return super()._crops(arch, sizes)


@dataclass(frozen=True)
class QwenGrid(Layout):
    """The native-resolution patch grid of a Qwen ViT: an image or video of ``(t, h, w)`` patches (an
    ``image_grid_thw`` / ``video_grid_thw`` row) makes ``t * h * w / m^2`` tokens (``m``: ``spatial_merge_size``)."""

    video: VideoLayout = GridVideo()
    name: ClassVar[str] = "grid"
    native_grid: ClassVar[bool] = True

    def image_decoder_tokens(self, selected):
        raise ValueError("a Qwen image's tokens follow its patch grid")

    def image_grids(self, config, image_size=None, tiled=True):
        raise ValueError(f"{self.family}: image grids follow image_grid_thw; use qwen_grid")

    def video_frame_tokens(self, arch):
        return None

    def workload(self, arch, sample):

        frames = check_count(sample.video_frames, "video_frames")
        if sample.vision_inputs not in (None, 0) or frames:
            raise ValueError(
                f"{arch.display}: give the encoder work as vision_grids=[(t, h, w), ...], not vision_inputs/video_frames"
            )
        grids = sample.vision_grids
        if grids is None:
            if sample.vision_tokens:
                raise ValueError(
                    f"{arch.display}: the encoder cost depends on the patch grids; pass vision_grids=[(t, h, w), ...] "
                    "(the rows of image_grid_thw / video_grid_thw), or get them from vtw.flops.image_layout"
                )
            grids = ()
        work = VisionWorkload(grids=tuple(tuple(g) for g in grids))
        self._check_grids(arch, work.grids, sample.vision_tokens)
        return work

    def _check_grids(self, arch, grids, vision_tokens: int) -> None:
        merge = arch.vision.spatial_merge
        for g in grids:
            if len(g) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in g):
                raise ValueError(f"vision_grids entries must be (t, h, w) positive ints, got {g!r}")
            if g[1] % merge or g[2] % merge:
                raise ValueError(f"grid {g}: h and w must be multiples of spatial_merge_size={merge}")
        made = sum(t * h * w for t, h, w in grids) // merge**2
        if made != vision_tokens:
            raise ValueError(
                f"{arch.display}: vision_grids {list(grids)} give {made} vision tokens, not vision_tokens={vision_tokens}"
            )

    def tower(self, arch, work):
        """One ViT pass over every patch, full attention within each frame (each ``t`` slice), windows in the
        Qwen2.5-VL blocks without full attention; the merger folds ``m x m`` patches into one token."""
        v = arch.vision
        patches = sum(t * h * w for t, h, w in work.grids)
        frames = [h * w for t, h, w in work.grids for _ in range(t)]
        windows = None
        if v.window_patches is not None:
            windows = [s for t, h, w in work.grids for s in _qwen_windows(v, t, h, w)]
        return TowerRuns(patches, frames, windows, patches, 0, patches // v.spatial_merge**2)

    def read_workload(self, arch, *, image_grid_thw=None, video_grid_thw=None, **_):

        grids = []
        for g in (image_grid_thw, video_grid_thw):
            if g is not None:
                grids += [tuple(int(v) for v in row) for row in g.tolist()]
        return VisionWorkload(grids=tuple(grids))

    def image(self, arch, height, width):
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        patch, merge = arch.vision.patch, arch.vision.spatial_merge
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
        grid = (1, h // patch, w // patch)
        tokens = grid[1] * grid[2] // merge**2
        note = f"resized to {w}x{h}, {grid[1]}x{grid[2]} patches"
        return ImageLayout((height, width), tokens, VisionWorkload(grids=(grid,)), note)

    def planned(self, arch, vision_tokens, image):
        """One image with a patch grid as square as possible giving ``vision_tokens`` tokens."""

        rows = max(d for d in range(1, math.isqrt(vision_tokens) + 1) if vision_tokens % d == 0)
        m, px = arch.vision.spatial_merge, arch.vision.patch
        grid = (1, rows * m, vision_tokens // rows * m)
        note = (
            f"one image of {grid[2] * px}x{grid[1] * px} px ({grid[1]}x{grid[2]} patches) giving {vision_tokens} tokens"
        )
        return VisionWorkload(grids=(grid,)), note


def _qwen_windows(v, t: int, h: int, w: int) -> list[int]:
    """Qwen2.5-VL window lengths (in patches) of one ``(t, h, w)`` grid: windows of ``window_patches`` merged units a
    side, tiled from the top-left, clipped at the bottom/right edge, per frame."""
    m, win = v.spatial_merge, v.window_patches
    mh, mw = h // m, w // m
    heights = [min(win, mh - r) for r in range(0, mh, win)]
    widths = [min(win, mw - c) for c in range(0, mw, win)]
    return [a * b * m * m for _ in range(t) for a in heights for b in widths]
