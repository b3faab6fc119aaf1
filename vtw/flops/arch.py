"""The dimensions the FLOPs model needs, read from a transformers config of a supported family.

:func:`architecture` turns a config into an :class:`Architecture`: the language decoder (:class:`DecoderDims`), the
vision encoder (:class:`VisionDims`), the projector (:class:`ProjectorDims`) and how many tokens each encoder input
gives to the projector and to the decoder (:class:`TokenRules`). Everything else in :mod:`vtw.flops` is arithmetic on
these numbers, so this is the only module that knows config field names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..families import get_family

#: Text-model types whose MLP is gated (gate_proj, up_proj, down_proj: three d x m matrices) and whose attention is
#: q/k/v/o projections with grouped KV heads. Every supported family's decoder is one of these.
GATED_DECODERS = ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text")

#: Vision encoders the model knows: CLIP (class token, 2-matrix MLP), SigLIP (no class token, 2-matrix MLP), the
#: Qwen2-VL ViT (3-D patches, full attention per frame, 2-matrix MLP, patch merger) and the Qwen2.5-VL ViT
#: (window attention except in ``fullatt_block_indexes``, gated MLP, patch merger).
VISION_KINDS = ("clip", "siglip", "qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class DecoderDims:
    """The language decoder.

    Attributes:
        num_layers: ``L``.
        hidden: ``d``, the residual width.
        heads: query heads ``H``.
        kv_heads: key/value heads ``G`` (``G < H``: grouped-query attention).
        head_dim: per-head width; the q projection maps ``d -> H * head_dim``, k and v ``d -> G * head_dim``.
        intermediate: ``m``, the MLP width (gate/up: ``d -> m``, down: ``m -> d``).
        vocab: LM head output size (``d -> vocab``).
    """

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class VisionDims:
    """The vision encoder (one of :data:`VISION_KINDS`).

    Attributes:
        kind: encoder kind.
        hidden: residual width ``D`` (``embed_dim`` for Qwen2-VL).
        intermediate: MLP width ``I``.
        layers: number of transformer blocks; all of them run, whatever ``vision_feature_layer`` selects.
        heads: attention heads (attention FLOPs do not depend on it, listed for completeness).
        patch: patch side in pixels.
        channels: input channels.
        image_size: input side in pixels of fixed-resolution encoders (CLIP/SigLIP), ``None`` for Qwen.
        temporal_patch: frames per 3-D patch (Qwen), 1 otherwise.
        spatial_merge: side of the patch block the Qwen merger folds into one token, 1 otherwise.
        window_patches: Qwen2.5-VL: side of an attention window in merged units (``window_size // merge // patch``).
        full_attention_blocks: Qwen2.5-VL: blocks with full (per-frame) attention; the others use windows.
        gated_mlp: three-matrix MLP (Qwen2.5-VL) instead of two.
        pooling_head: SigLIP's attention-pooling head runs after the blocks (``vision_use_head=True``; the
            LLaVA-OneVision checkpoints set it False, transformers' SigLIP default is True).
    """

    kind: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch: int
    channels: int
    image_size: int | None = None
    temporal_patch: int = 1
    spatial_merge: int = 1
    window_patches: int | None = None
    full_attention_blocks: tuple[int, ...] = ()
    gated_mlp: bool = False
    pooling_head: bool = False

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"

    @property
    def patches_per_input(self) -> int:
        """Patches of one fixed-resolution input (CLIP/SigLIP): ``(image_size // patch) ** 2``."""
        if self.image_size is None:
            raise ValueError(f"{self.kind} encoder has no fixed input size")
        return (self.image_size // self.patch) ** 2

    @property
    def tokens_per_input(self) -> int:
        """Sequence length inside a fixed-resolution encoder: patches plus the class token where there is one."""
        return self.patches_per_input + int(self.has_cls)

    @property
    def patch_numel(self) -> int:
        """Inputs of one patch: ``channels * temporal_patch * patch ** 2`` (the patch-embedding conv's fan-in)."""
        return self.channels * self.temporal_patch * self.patch**2


@dataclass(frozen=True)
class ProjectorDims:
    """A two-linear projector (LLaVA's ``multi_modal_projector``, Qwen's patch merger MLP): ``in -> mid -> out``."""

    in_dim: int
    mid_dim: int
    out_dim: int

    def flops_per_token(self) -> int:
        return 2 * (self.in_dim * self.mid_dim + self.mid_dim * self.out_dim)


@dataclass(frozen=True)
class TokenRules:
    """How many tokens one encoder input yields, for the fixed-resolution families.

    Attributes:
        image_projector_tokens: projector rows per image input (crop): the patches, plus the class token when the
            ``vision_feature_select_strategy`` is ``"full"`` and the encoder has one.
        image_decoder_tokens: decoder tokens per image of the non-anyres families (LLaVA-1.5, Video-LLaVA), else None.
        video_projector_tokens: projector rows per video frame (None: the family takes no video).
        video_decoder_tokens: decoder tokens per video frame (None: the family takes no video).
        video_extra_tokens: decoder tokens added once per video (LLaVA-OneVision's newline).
    """

    image_projector_tokens: int
    image_decoder_tokens: int | None
    video_projector_tokens: int | None
    video_decoder_tokens: int | None
    video_extra_tokens: int = 0


@dataclass(frozen=True)
class Architecture:
    """Everything the FLOPs model reads from a config."""

    family: str  # config.model_type of the top-level model
    display: str
    decoder: DecoderDims
    vision: VisionDims
    projector: ProjectorDims
    tokens: TokenRules | None  # None for the Qwen families (token counts follow the patch grid)
    anyres: bool  # LLaVA-NeXT-style tiling: the number of crops depends on the image size
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    vision_aspect_ratio: str | None = None  # LLaVA-OneVision's "anyres_max_N"

    @property
    def is_qwen(self) -> bool:
        return self.vision.kind in ("qwen2_vl", "qwen2_5_vl")


def _int(value, what: str) -> int:
    if value is None:
        raise ValueError(f"config has no {what}")
    return int(value)


def _decoder(text) -> DecoderDims:
    model_type = getattr(text, "model_type", None)
    if model_type not in GATED_DECODERS:
        raise ValueError(
            f"language decoder model_type={model_type!r} is not covered by the FLOPs model; covered: {GATED_DECODERS}"
        )
    hidden = _int(text.hidden_size, "text hidden_size")
    heads = _int(text.num_attention_heads, "text num_attention_heads")
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return DecoderDims(
        num_layers=_int(text.num_hidden_layers, "text num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=_int(text.intermediate_size, "text intermediate_size"),
        vocab=_int(text.vocab_size, "text vocab_size"),
    )


def _fixed_vision(vc, kind: str) -> VisionDims:
    return VisionDims(
        kind=kind,
        hidden=_int(vc.hidden_size, "vision hidden_size"),
        intermediate=_int(vc.intermediate_size, "vision intermediate_size"),
        layers=_int(vc.num_hidden_layers, "vision num_hidden_layers"),
        heads=_int(vc.num_attention_heads, "vision num_attention_heads"),
        patch=_int(vc.patch_size, "vision patch_size"),
        channels=int(getattr(vc, "num_channels", 3)),
        image_size=_int(vc.image_size, "vision image_size"),
        pooling_head=kind == "siglip" and bool(getattr(vc, "vision_use_head", False)),
    )


def _num_feature_layers(config) -> int:
    layer = getattr(config, "vision_feature_layer", -1)
    return 1 if isinstance(layer, int) else len(layer)


def _pooled_side(side: int, stride: int) -> int:
    return side // stride  # AvgPool2d / MaxPool2d with kernel = stride = s, no padding


def architecture(config) -> Architecture:
    """Read an :class:`Architecture` from a config of a supported family.

    Raises:
        ValueError: unsupported family (listing the supported ones), or a configuration option the FLOPs model does
            not cover (named in the message).
    """
    spec = get_family(config)  # ValueError listing the supported families
    family = spec.model_type
    text = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    decoder = _decoder(text)
    vc = config.vision_config
    if family in ("qwen2_vl", "qwen2_5_vl"):
        merge = _int(vc.spatial_merge_size, "vision spatial_merge_size")
        patch = _int(vc.patch_size, "vision patch_size")
        if family == "qwen2_vl":
            width = _int(vc.embed_dim, "vision embed_dim")
            vision = VisionDims(
                kind="qwen2_vl",
                hidden=width,
                intermediate=int(width * vc.mlp_ratio),
                layers=_int(vc.depth, "vision depth"),
                heads=_int(vc.num_heads, "vision num_heads"),
                patch=patch,
                channels=int(getattr(vc, "in_channels", 3)),
                temporal_patch=_int(vc.temporal_patch_size, "vision temporal_patch_size"),
                spatial_merge=merge,
            )
            out_dim = _int(vc.hidden_size, "vision hidden_size (merger output)")
        else:
            width = _int(vc.hidden_size, "vision hidden_size")
            vision = VisionDims(
                kind="qwen2_5_vl",
                hidden=width,
                intermediate=_int(vc.intermediate_size, "vision intermediate_size"),
                layers=_int(vc.depth, "vision depth"),
                heads=_int(vc.num_heads, "vision num_heads"),
                patch=patch,
                channels=int(getattr(vc, "in_channels", 3)),
                temporal_patch=_int(vc.temporal_patch_size, "vision temporal_patch_size"),
                spatial_merge=merge,
                window_patches=_int(vc.window_size, "vision window_size") // merge // patch,
                full_attention_blocks=tuple(int(i) for i in vc.fullatt_block_indexes),
                gated_mlp=True,
            )
            out_dim = _int(vc.out_hidden_size, "vision out_hidden_size")
        merged = width * merge**2
        return Architecture(
            family=family,
            display=spec.display,
            decoder=decoder,
            vision=vision,
            projector=ProjectorDims(merged, merged, out_dim),
            tokens=None,
            anyres=False,
        )

    vision_type = getattr(vc, "model_type", None)
    kinds = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
    if vision_type not in kinds:
        raise ValueError(
            f"{spec.display}: vision tower model_type={vision_type!r} is not covered by the FLOPs model; "
            f"covered: {tuple(kinds)}"
        )
    vision = _fixed_vision(vc, kinds[vision_type])
    projector = ProjectorDims(vision.hidden * _num_feature_layers(config), decoder.hidden, decoder.hidden)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}; allowed: 'default', 'full'")
    selected = vision.patches_per_input if strategy == "default" and vision.has_cls else vision.tokens_per_input
    if strategy == "default" and not vision.has_cls:
        selected = vision.patches_per_input - 1  # the model drops the first patch: what transformers does
    side = int(math.isqrt(vision.patches_per_input))
    anyres = family in ("llava_next", "llava_onevision", "llava_next_video")
    video_proj = video_dec = None
    video_extra = 0
    if family == "video_llava":
        video_proj = video_dec = vision.tokens_per_input  # videos keep every token, class token included
    elif family == "llava_next_video":
        mode = getattr(config, "spatial_pool_mode", "average")
        if mode not in ("average", "max"):
            raise ValueError(f"LLaVA-NeXT-Video spatial_pool_mode={mode!r} is not covered; covered: average, max")
        pooled = _pooled_side(side, int(config.spatial_pool_stride)) ** 2
        video_proj = video_dec = pooled  # pooled before the projector
    elif family == "llava_onevision":
        video_proj = selected  # projected, then bilinearly resized to ceil(side / 2) squared
        video_dec = math.ceil(side / 2) ** 2
        video_extra = 1  # one image_newline per video
    tokens = TokenRules(
        image_projector_tokens=selected,
        image_decoder_tokens=None if anyres else selected,
        video_projector_tokens=video_proj,
        video_decoder_tokens=video_dec,
        video_extra_tokens=video_extra,
    )
    pinpoints = tuple((int(h), int(w)) for h, w in (getattr(config, "image_grid_pinpoints", None) or ()))
    return Architecture(
        family=family,
        display=spec.display,
        decoder=decoder,
        vision=vision,
        projector=projector,
        tokens=tokens,
        anyres=anyres,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=getattr(config, "vision_aspect_ratio", None) if family == "llava_onevision" else None,
    )
