"""Where each image's and video's tokens lie in the decoder's sequence, as 2-D grids: what the methods that act on
the vision-token grid before the decoder (``pool``, ``visionzip``) and the FLOPs model of their shorter sequence need.

Every family lays one image or video out as one or more :class:`Grid`, in sequence order, filling that input's
placeholder tokens (``image_token_id`` for images, ``video_token_id`` for videos):

=====================  =========================================================================================
LLaVA-1.5, Video-LLaVA  image: ``side x side`` patches (plus the class token first under
                        ``vision_feature_select_strategy="full"``); Video-LLaVA video: per frame the class token,
                        then ``side x side`` patches
LLaVA-NeXT(-Video)      image: the base crop ``side x side``, then the unpadded crop grid ``rows x cols`` with one
                        newline token after each row; NeXT-Video video: per frame ``side/stride`` squared
LLaVA-OneVision         one image per sample: as LLaVA-NeXT, large grids downscaled (``anyres_max_N``); several
                        images per sample: each ``side x side`` plus one newline; video: per frame
                        ``ceil(side/2)`` squared, then one newline per video
Qwen2-VL / Qwen2.5-VL   image and video: ``t`` slices of ``h/m x w/m`` merged patches (``image_grid_thw`` /
                        ``video_grid_thw`` rows, ``m`` = ``spatial_merge_size``)
=====================  =========================================================================================

:func:`input_layouts` reads every sample's grids from the tensors a processor produced (the arguments of the model's
forward), :func:`grid_positions` finds their tokens in ``input_ids``. The arithmetic of LLaVA-NeXT's tiling
(:func:`best_resolution`, :func:`unpadded`) lives here and the FLOPs model uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .families import get_family
from .shapes import Grid, SampleLayout


def _crop_grid(config) -> Grid:
    """One fixed-resolution encoder input (an image, or a base crop) after ``vision_feature_select_strategy``."""
    return get_family(config).layout.crop_grid(config)


def image_grids(config, image_size: tuple[int, int] | None = None, tiled: bool = True) -> tuple[Grid, ...]:
    """The grids of one image of ``image_size = (height, width)`` pixels (anyres families; ignored otherwise).

    Args:
        tiled: LLaVA-OneVision tiles an image only when it is its sample's only image; ``False``: one of several.
    """
    return get_family(config).layout.image_grids(config, image_size, tiled)


def qwen_grid(config, thw: Sequence[int]) -> Grid:
    """A Qwen image or video of patch grid ``thw = (t, h, w)`` (an ``image_grid_thw`` row): ``t`` slices of
    ``h/m x w/m`` merged patches."""
    m = int(config.vision_config.spatial_merge_size)
    t, h, w = (int(v) for v in thw)
    return Grid(h // m, w // m, frames=t)


def video_grid(config, frames: int) -> Grid:
    """One video of ``frames`` frames of a fixed-resolution family."""
    return get_family(config).layout.video.frame_grid(config, frames)


def input_layouts(config, input_ids: torch.Tensor, inputs: dict) -> list[SampleLayout]:
    """Every sample's grids, read from the model inputs a processor produced.

    Args:
        config: the model's config; input_ids: ``(B, T)``.
        inputs: the other processor outputs: ``image_sizes`` ``(N, 2)`` (anyres), ``image_grid_thw`` /
            ``video_grid_thw`` ``(N, 3)`` (Qwen), ``pixel_values_videos`` ``(videos, frames, C, H, W)`` (the others),
            images and videos of all samples in batch order.

    Raises:
        ValueError: the placeholders of a sample do not add up to whole images or videos.
    """
    spec = get_family(config)
    ids = spec.vision_token_ids(config)
    image_id, video_id = ids[0], (ids[1] if len(ids) > 1 else None)
    n_image = (input_ids == image_id).sum(1).tolist()
    n_video = (input_ids == video_id).sum(1).tolist() if video_id is not None else [0] * len(input_ids)

    def rows(key):
        value = inputs.get(key)
        return [] if value is None else [tuple(int(v) for v in r) for r in torch.as_tensor(value).tolist()]

    sizes = rows("image_sizes")
    if spec.image_layout == "grid":
        images = [(qwen_grid(config, r),) for r in rows("image_grid_thw")]
        videos = [qwen_grid(config, r) for r in rows("video_grid_thw")]
    else:
        if spec.image_layout == "single":
            images = [image_grids(config)] * (sum(n_image) // _crop_grid(config).tokens)
        else:  # OneVision tiles an image only when it is alone in its sample (the processor's batch_num_images)
            per_sample = inputs.get("batch_num_images")
            tiled = [True] * len(sizes)
            if per_sample is not None and spec.image_layout == "anyres_max":
                tiled = [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
            images = [image_grids(config, size, tiled=t) for size, t in zip(sizes, tiled)]
        videos = []
        pv = inputs.get("pixel_values_videos")
        if pv is not None:
            videos = [video_grid(config, int(pv.shape[1]))] * int(pv.shape[0])
    out, i_img, i_vid = [], 0, 0
    for b in range(len(input_ids)):
        sample_images, i_img = _take(images, i_img, n_image[b], lambda g: sum(x.tokens for x in g), spec, b)
        sample_videos, i_vid = _take(videos, i_vid, n_video[b], lambda g: g.tokens, spec, b)
        out.append(SampleLayout(tuple(g for grids in sample_images for g in grids), tuple(sample_videos)))
    return out


def _take(items, start, tokens, size, spec, b):
    """Consume items from ``start`` until their sizes add up to ``tokens``; returns ``(items, next start)``."""
    taken, total, i = [], 0, start
    while total < tokens and i < len(items):
        taken.append(items[i])
        total += size(items[i])
        i += 1
    if total != tokens:
        raise ValueError(
            f"{spec.display} sample {b}: its {tokens} placeholder tokens do not add up to the grids of its inputs"
        )
    return taken, i


@dataclass(frozen=True)
class PlacedGrid:
    """A grid of one sample with the sequence positions of its tokens.

    Attributes:
        cells: ``(frames, rows, cols)`` long, the position in ``T`` of each grid cell.
        newlines: ``(frames, rows)`` long, the position of each row's newline token (``None``: no newlines).
    """

    grid: Grid
    cells: torch.Tensor
    newlines: torch.Tensor | None


def grid_positions(config, input_ids: torch.Tensor, layouts: list[SampleLayout]) -> list[list[PlacedGrid]]:
    """Each sample's grids (images first, then videos, each in sequence order) placed in ``input_ids`` ``(B, T)``."""
    ids = get_family(config).vision_token_ids(config)
    out = []
    for b, layout in enumerate(layouts):
        sample = []
        for token_id, grids in zip(ids, (layout.images, layout.videos)):
            where = torch.nonzero(input_ids[b] == token_id).flatten()
            offset = 0
            for g in grids:
                cells = where[offset + g.cell_index().to(where.device)]
                newlines = None
                if g.newline:
                    newlines = where[offset + g.cell_index()[:, :, -1].to(where.device) + 1]
                sample.append(PlacedGrid(g, cells, newlines))
                offset += g.tokens
        out.append(sample)
    return out


def counted_layout(
    config, vision_tokens: int, *, video_frames: int = 0, videos: int = 0, qwen_grids: Sequence[Sequence[int]] = ()
) -> SampleLayout:
    """The layout of one sample known from counts alone: Qwen (its ``(t, h, w)`` grids), or a family with one fixed
    grid per image (LLaVA-1.5, Video-LLaVA) with ``video_frames`` frames in ``videos`` videos (1 when only frames
    are given). The anyres families' grids depend on each image's size: give :func:`image_grids` instead.

    Raises:
        ValueError: an anyres family with image tokens, or counts that are not whole images.
    """
    spec = get_family(config)
    if spec.image_layout == "grid":
        layout = SampleLayout(images=tuple(qwen_grid(config, g) for g in qwen_grids))
    else:
        n_videos = max(int(videos), 1) if video_frames else 0
        vids = tuple(video_grid(config, video_frames // n_videos) for _ in range(n_videos))
        rest = vision_tokens - sum(g.tokens for g in vids)
        if rest and spec.anyres:
            raise ValueError(
                f"{spec.display}: each image's grid depends on its size; give the sample's layout "
                "(vision_layout=vtw.grids.SampleLayout(images=vtw.grids.image_grids(config, (height, width))))"
            )
        per = _crop_grid(config).tokens if rest else 1
        if rest < 0 or rest % per:
            raise ValueError(f"{spec.display}: {vision_tokens} vision tokens are not whole images of {per} tokens")
        layout = SampleLayout(images=tuple(g for _ in range(rest // per) for g in image_grids(config)), videos=vids)
    if layout.tokens != vision_tokens:
        raise ValueError(f"{spec.display}: the grids {layout} give {layout.tokens} tokens, not {vision_tokens}")
    return layout
