"""The dimensions the FLOPs model needs, read from a transformers config of a supported family.

:func:`architecture` turns a config into an :class:`Architecture`: the language decoder (:class:`DecoderDims`), the
vision encoder (:class:`VisionDims`), the projector (:class:`ProjectorDims`) and how many tokens each encoder input
gives to the projector and to the decoder (:class:`TokenRules`). Everything else in :mod:`vtw.flops` is arithmetic on
these numbers, so this is the only module that knows config field names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .families import FamilySpec, family, get_family
from .layouts import Layout

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
    def spec(self) -> FamilySpec:
        """The family's registry entry."""
        return family(self.family)

    @property
    def layout(self) -> Layout:
        """How the family lays its images and videos out (:mod:`vtw.layouts`): what the counts below depend on."""
        return self.spec.layout


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


def _qwen2_vl_vision(vc) -> tuple[VisionDims, int]:
    """The Qwen2-VL ViT and its merger's output width."""
    width = _int(vc.embed_dim, "vision embed_dim")
    vision = VisionDims(
        kind="qwen2_vl",
        hidden=width,
        intermediate=int(width * vc.mlp_ratio),
        layers=_int(vc.depth, "vision depth"),
        heads=_int(vc.num_heads, "vision num_heads"),
        patch=_int(vc.patch_size, "vision patch_size"),
        channels=int(getattr(vc, "in_channels", 3)),
        temporal_patch=_int(vc.temporal_patch_size, "vision temporal_patch_size"),
        spatial_merge=_int(vc.spatial_merge_size, "vision spatial_merge_size"),
    )
    return vision, _int(vc.hidden_size, "vision hidden_size (merger output)")


def _qwen2_5_vl_vision(vc) -> tuple[VisionDims, int]:
    """The Qwen2.5-VL ViT (windows, gated MLP) and its merger's output width."""
    merge = _int(vc.spatial_merge_size, "vision spatial_merge_size")
    patch = _int(vc.patch_size, "vision patch_size")
    vision = VisionDims(
        kind="qwen2_5_vl",
        hidden=_int(vc.hidden_size, "vision hidden_size"),
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
    return vision, _int(vc.out_hidden_size, "vision out_hidden_size")


#: FamilySpec.encoder of the Qwen families -> reader of (vision dims, merger output width)
_QWEN_ENCODERS = {"qwen2_vl": _qwen2_vl_vision, "qwen2_5_vl": _qwen2_5_vl_vision}
#: vision_config.model_type of the fixed-resolution towers -> VisionDims.kind
_FIXED_ENCODERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def _selected_tokens(config, vision: VisionDims) -> int:
    """Projector rows per image input under ``vision_feature_select_strategy``."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}; allowed: 'default', 'full'")
    if strategy == "full":
        return vision.tokens_per_input
    if vision.has_cls:
        return vision.patches_per_input
    return vision.patches_per_input - 1  # no class token: the model drops the first patch, as transformers does


def architecture(config) -> Architecture:
    """Read an :class:`Architecture` from a config of a supported family (its :class:`FamilySpec` says how).

    Raises:
        ValueError: unsupported family (listing the supported ones), or a configuration option the FLOPs model does
            not cover (named in the message).
    """
    spec = get_family(config)  # ValueError listing the supported families
    text = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    decoder = _decoder(text)
    return _ARCHITECTURES[spec.encoder](spec, config, decoder)


def _qwen_architecture(spec: FamilySpec, config, decoder: DecoderDims) -> Architecture:
    vision, out_dim = _QWEN_ENCODERS[spec.encoder](config.vision_config)
    merged = vision.hidden * vision.spatial_merge**2
    # no token rules (the counts follow the patch grid), no anyres tiling
    return Architecture(
        spec.model_type, spec.display, decoder, vision, ProjectorDims(merged, merged, out_dim), None, False
    )


def _fixed_architecture(spec: FamilySpec, config, decoder: DecoderDims) -> Architecture:
    vc = config.vision_config
    vision_type = getattr(vc, "model_type", None)
    if vision_type not in _FIXED_ENCODERS:
        raise ValueError(
            f"{spec.display}: vision tower model_type={vision_type!r} is not covered by the FLOPs model; "
            f"covered: {tuple(_FIXED_ENCODERS)}"
        )
    vision = _fixed_vision(vc, _FIXED_ENCODERS[vision_type])
    projector = ProjectorDims(vision.hidden * _num_feature_layers(config), decoder.hidden, decoder.hidden)
    selected = _selected_tokens(config, vision)
    side = int(math.isqrt(vision.patches_per_input))
    video_proj, video_dec, video_extra = spec.layout.video.frame_tokens(config, side, vision.tokens_per_input, selected)
    tokens = TokenRules(
        image_projector_tokens=selected,
        image_decoder_tokens=spec.layout.image_decoder_tokens(selected),
        video_projector_tokens=video_proj,
        video_decoder_tokens=video_dec,
        video_extra_tokens=video_extra,
    )
    pinpoints = tuple((int(h), int(w)) for h, w in (getattr(config, "image_grid_pinpoints", None) or ()))
    parts = (vision, projector, tokens, spec.anyres, pinpoints, spec.layout.aspect_ratio(config))
    return Architecture(spec.model_type, spec.display, decoder, *parts)


#: FamilySpec.encoder -> the reader of that encoder's architecture
_ARCHITECTURES = {"fixed": _fixed_architecture, "qwen2_vl": _qwen_architecture, "qwen2_5_vl": _qwen_architecture}
