"""What one sample sends through the vision encoder, and how many decoder tokens that makes.

A :class:`VisionWorkload` describes the encoder side of one sample: fixed-resolution encoder passes (images, or the
crops of LLaVA-NeXT-style "anyres" tiling), video frames, and for the Qwen families the ``(t, h, w)`` patch grid of
every image and video (the rows of ``image_grid_thw`` / ``video_grid_thw``).

* :func:`image_layout` computes the workload and the decoder's vision-token count of one image of a given pixel size,
  with the same arithmetic as the pinned transformers' processors (anyres tiling and unpadding, OneVision's
  ``anyres_max_N`` downscaling, Qwen's ``smart_resize``). The planning command uses it for its default image.
* :func:`workload_from_inputs` reads the workload of one sample from the tensors a processor produced
  (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...): what an evaluation logs per sample.
* :class:`SampleCounts` is one sample as the FLOPs model counts it (tokens, generated tokens, encoder work, grids).

How a family's tokens lie (tiling, ``smart_resize``, what the processor's tensors mean) is its layout's
(:mod:`vtw.layouts`); this module holds the data and the entry points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .arch import architecture
from .shapes import ImageLayout, SampleLayout, VisionWorkload, check_count

#: The planning command's default image: one 640 x 480 (W x H) photo, the size of a typical COCO / VQAv2 image.
DEFAULT_IMAGE_SIZE = (480, 640)  # (height, width)


@dataclass(frozen=True)
class SampleCounts:
    """One sample as the FLOPs model counts it: what :func:`~vtw.flops.count_flops`, :func:`~vtw.flops.paper_flops`,
    the planning table, the lmms-eval meter and the budget matcher all take.

    Attributes:
        vision_tokens: vision (image + video placeholder) tokens in the prompt, ``V``.
        text_tokens: the other prompt tokens, ``T`` (>= 1).
        generated_tokens: new tokens produced, ``G``; ``generate`` runs the prefill (which yields the first) and
            ``G - 1`` decode steps.
        vision_inputs: fixed-resolution encoder passes for images (images, or anyres crops). ``None``: derived from
            ``vision_tokens`` (LLaVA-1.5, Video-LLaVA); required for anyres images.
        video_frames: video frames through a fixed-resolution encoder; videos: how many videos they make.
        vision_grids: Qwen families: ``(t, h, w)`` patch grid of every image and video (``image_grid_thw`` rows).
        vision_layout: the sample's image and video grids (:class:`vtw.grids.SampleLayout`), which methods acting
            before the decoder (``pool``, ``visionzip``) need; derived from the counts where they determine it
            (LLaVA-1.5, Video-LLaVA, the Qwen grids), required for anyres images.
    """

    vision_tokens: int
    text_tokens: int
    generated_tokens: int = 0
    vision_inputs: int | None = None
    video_frames: int = 0
    videos: int = 0
    vision_grids: Sequence[Sequence[int]] | None = None
    vision_layout: SampleLayout | None = None

    @classmethod
    def of(
        cls,
        work: VisionWorkload,
        vision_tokens: int,
        text_tokens: int,
        generated_tokens: int = 0,
        vision_layout: SampleLayout | None = None,
    ) -> SampleCounts:
        """The counts of a sample whose encoder work is ``work`` (the one conversion of a :class:`VisionWorkload`)."""
        encoder = (work.image_inputs, work.video_frames, work.videos, work.grids)
        return cls(vision_tokens, text_tokens, generated_tokens, *encoder, vision_layout)

    def checked(self) -> SampleCounts:
        """These counts, checked: ints, ``text_tokens >= 1``, the others ``>= 0`` (else ``ValueError``)."""
        check_count(self.vision_tokens, "vision_tokens")
        check_count(self.text_tokens, "text_tokens", minimum=1)
        check_count(self.generated_tokens, "generated_tokens")
        return self


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
    return arch.layout.image(arch, *image_size)


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
    return arch.layout.read_workload(
        arch,
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        pixel_values_videos=pixel_values_videos,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
    )
