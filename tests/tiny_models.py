"""Tiny models of every supported family, built from configs (no hub), with matching multimodal inputs.

The number of vision tokens each image/video takes is not hard-coded: it is read from the model's own feature
extractor (``get_image_features`` / ``get_video_features``) or, for Qwen2-VL, from its patch grid, so the inputs stay
consistent with the pinned transformers.

Usage::

    model = build_tiny_model("llava", attn_implementation="sdpa", num_layers=4)
    batch = make_batch(model, [Sample(images=1, prefix=3, suffix=5), Sample(prefix=4, suffix=2)])
    model(**batch)  # batch: input_ids (B, T), attention_mask (B, T) left-padded, pixel tensors
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as T
from tiny_configs import tiny_config

from vtw.families import SUPPORTED_FAMILIES, family, family_specs, get_family
from vtw.synthvideo.configs import TINY_HIDDEN, TINY_IMAGE_ID, TINY_PAD_ID, TINY_VIDEO_ID, TINY_VOCAB

FAMILIES = SUPPORTED_FAMILIES
VIDEO_FAMILIES = tuple(spec.model_type for spec in family_specs() if spec.takes_video)

VOCAB = TINY_VOCAB
IMAGE_ID = TINY_IMAGE_ID
VIDEO_ID = TINY_VIDEO_ID
PAD_ID = TINY_PAD_ID
HIDDEN = TINY_HIDDEN


def build_tiny_model(
    family: str, attn_implementation: str = "sdpa", num_layers: int = 4, seed: int = 0
) -> T.PreTrainedModel:
    """A randomly initialised tiny model of ``family`` in eval mode, float32, on CPU."""
    config = tiny_config(family, num_layers)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(T, get_family(config).model_class)(config).eval()
    # Random init (std 0.02) gives near-uniform attention, under which token positions barely matter and a wrong
    # position or mask would go unnoticed. Sharpen the decoder: larger embeddings and query/key projections.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" in name:
                p.mul_(20.0)
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(12.0)
    return model


@dataclass(frozen=True)
class Sample:
    """One prompt: ``prefix`` text tokens, then ``images`` images and ``videos`` videos, then ``suffix`` text tokens."""

    images: int = 0
    videos: int = 0
    prefix: int = 3
    suffix: int = 4
    image_shape: tuple[int, int] = (32, 32)  # (H, W) in pixels (anyres families make several crops of it)
    frames: int = 2  # frames per video where the family takes any number (Qwen: 2 per temporal patch)


def _pixels(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g) * 2 - 1


def _qwen_patches(model) -> tuple:
    """A Qwen model's vision config and the width of one flattened patch (its ``pixel_values`` rows)."""
    vc = model.config.vision_config
    return vc, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2


def _image_inputs(family_name: str, model, samples: list[Sample], g: torch.Generator) -> tuple[dict, list[list[int]]]:
    """Pixel kwargs for every image of the batch and the token count of each image, per sample."""
    n = sum(s.images for s in samples)
    if n == 0:
        return {}, [[] for _ in samples]
    inner, spec = model.model, family(family_name)
    if spec.layout.native_grid:
        vc, patch_dim = _qwen_patches(model)
        grids, rows = [], []
        for s in samples:
            for _ in range(s.images):
                h, w = (dim // vc.patch_size for dim in s.image_shape)
                grids.append([1, h, w])
                rows.append(_pixels(g, h * w, patch_dim))
        grid = torch.tensor(grids)
        counts = (grid.prod(-1) // vc.spatial_merge_size**2).tolist()
        kwargs = {spec.image_key: torch.cat(rows), "image_grid_thw": grid}
    elif not spec.anyres:  # LLaVA-1.5, Video-LLaVA (its own pixel key)
        size = model.config.vision_config.image_size
        kwargs = {spec.image_key: _pixels(g, n, 3, size, size)}
        with torch.no_grad():
            feats = inner.get_image_features(kwargs[spec.image_key]).pooler_output
        counts = [int(f.shape[0]) for f in feats] if isinstance(feats, (list, tuple)) else [feats.shape[1]] * n
    else:  # anyres families: llava_next, llava_onevision, llava_next_video
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = model.config.vision_config.image_size
        sizes = [s.image_shape for s in samples for _ in range(s.images)]
        n_crops = [image_size_to_num_patches(sz, model.config.image_grid_pinpoints, size) for sz in sizes]
        pv = torch.zeros(n, max(n_crops), 3, size, size)
        for i, c in enumerate(n_crops):
            pv[i, :c] = _pixels(g, c, 3, size, size)
        kwargs = {spec.image_key: pv, "image_sizes": torch.tensor(sizes)}
        with torch.no_grad():
            feats = inner.get_image_features(**kwargs).pooler_output
        counts = [int(f.shape[0]) for f in feats]
    per_sample, it = [], iter(counts)
    for s in samples:
        per_sample.append([next(it) for _ in range(s.images)])
    return kwargs, per_sample


def _video_inputs(family_name: str, model, samples: list[Sample], g: torch.Generator, frames: int = 2):
    if not (n := sum(s.videos for s in samples)):
        return {}, [[] for _ in samples]
    inner, spec = model.model, family(family_name)
    if spec.layout.native_grid:
        vc, patch_dim = _qwen_patches(model)
        h = w = 32 // vc.patch_size
        t = frames // vc.temporal_patch_size
        grid = torch.tensor([[t, h, w]] * n)
        kwargs = {spec.video_key: _pixels(g, n * t * h * w, patch_dim), "video_grid_thw": grid}
        counts = (grid.prod(-1) // vc.spatial_merge_size**2).tolist()
    else:
        size = model.config.vision_config.image_size
        key = spec.video_key
        kwargs = {key: _pixels(g, n, spec.video_frames or frames, 3, size, size)}
        with torch.no_grad():
            out = inner.get_video_features(kwargs[key])
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            counts = [int(f.numel() // f.shape[-1]) for f in feats]
        else:
            counts = [int(feats.numel() // feats.shape[-1] // n)] * n
    per_sample, it = [], iter(counts)
    for s in samples:
        per_sample.append([next(it) for _ in range(s.videos)])
    return kwargs, per_sample


def _single(model, sample: Sample, seed: int) -> dict[str, torch.Tensor]:
    spec = get_family(model)
    g = torch.Generator().manual_seed(seed)
    img_kwargs, (ic,) = _image_inputs(spec.model_type, model, [sample], g)
    vid_kwargs, (vc,) = _video_inputs(spec.model_type, model, [sample], g, frames=sample.frames)
    image_id = model.config.image_token_id
    video_id = getattr(model.config, "video_token_id", None)
    ids = torch.randint(1, 140, (sample.prefix,), generator=g).tolist()
    for c in ic:
        ids += [image_id] * c + torch.randint(1, 140, (1,), generator=g).tolist()
    for c in vc:
        ids += [video_id] * c + torch.randint(1, 140, (1,), generator=g).tolist()
    ids += torch.randint(1, 140, (sample.suffix,), generator=g).tolist()
    ids_t = torch.tensor([ids])
    out = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), **img_kwargs, **vid_kwargs}
    if spec.mrope:  # M-RoPE needs the token types: 0 text, 1 image, 2 video
        out["mm_token_type_ids"] = (ids_t == image_id).int() + 2 * (ids_t == video_id).int()
    return out


def collate(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Left-pad ``input_ids``/``attention_mask`` and concatenate the pixel tensors of single-sample inputs."""
    width = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key not in parts[0]:
            continue
        rows = [
            torch.nn.functional.pad(p[key], (width - p[key].shape[1], 0), value=PAD_ID if key == "input_ids" else 0)
            for p in parts
        ]
        out[key] = torch.cat(rows)
    for key in sorted({k for p in parts for k in p} - {"input_ids", "attention_mask", "mm_token_type_ids"}):
        ts = [p[key] for p in parts if key in p]
        if key == "pixel_values" and ts[0].dim() == 5:  # anyres: (images, crops, C, H, W), pad the crops
            crops = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, crops - t.shape[1])) for t in ts]
        out[key] = torch.cat(ts)
    return out


def make_batch(model, samples: list[Sample], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded batch: ``input_ids`` (B, T), ``attention_mask`` (B, T) and the family's pixel tensors.

    Text token ids are drawn from ``[1, 140)`` (never the image/video/pad ids); each image or video contributes as many
    placeholder tokens as the model's feature extractor produces for it. Sample ``i`` is drawn with seed ``seed + i``,
    so ``make_singles`` gives the very same samples one by one.
    """
    return collate([_single(model, s, seed + i) for i, s in enumerate(samples)])


def make_singles(model, samples: list[Sample], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The samples of ``make_batch(model, samples, seed)``, each as its own unpadded batch of one."""
    return [_single(model, s, seed + i) for i, s in enumerate(samples)]


def family_of(model) -> str:
    return get_family(model).model_type
