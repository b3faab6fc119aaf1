"""Exact matmul FLOPs of one sample: vision encoder, projector, decoder prefill and every decode step.

See the package docstring (:mod:`vtw.flops`) for what is counted. All arithmetic is on Python ints (exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..grids import SampleLayout, counted_layout
from ..methods import Reduction, Withdrawal
from ..methods.attention import last_token_attention_flops
from ..withdraw import validate_layer
from .arch import Architecture, DecoderDims, VisionDims, architecture
from .layout import VisionWorkload

TERA = 10**12


@dataclass(frozen=True)
class VisionFlops:
    """Vision-encoder FLOPs by part (all blocks summed)."""

    patch_embed: int = 0  # the patch-embedding convolution
    attention_proj: int = 0  # q, k, v and output projections
    attention_scores: int = 0  # Q K^T and (softmax) V, per attention segment (image / frame / window)
    mlp: int = 0
    pooling_head: int = 0  # SigLIP's attention-pooling head (one probe query per input), where the config has one

    @property
    def total(self) -> int:
        return self.patch_embed + self.attention_proj + self.attention_scores + self.mlp + self.pooling_head


@dataclass(frozen=True)
class PhaseFlops:
    """FLOPs of one phase (prefill, or all decode steps together) by component."""

    vision_tower: int = 0
    projector: int = 0
    decoder_attention_proj: int = 0  # q, k, v, o projections of the language decoder
    decoder_attention_scores: int = 0  # Q K^T and A V over every (query, key) pair, masked pairs included
    decoder_mlp: int = 0  # gate, up and down projections
    lm_head: int = 0  # only the positions whose logits are computed
    reduction: int = 0  # the method's own work (FastV/PyramidDrop attention scoring; prefill only)

    @property
    def decoder(self) -> int:
        return self.decoder_attention_proj + self.decoder_attention_scores + self.decoder_mlp

    @property
    def total(self) -> int:
        return self.vision_tower + self.projector + self.decoder + self.lm_head + self.reduction


COMPONENTS = tuple(PhaseFlops.__dataclass_fields__)


@dataclass(frozen=True)
class FlopsReport:
    """Matmul FLOPs of one sample (one multiply-add = 2 FLOPs).

    Attributes:
        prefill: the prefill forward (vision encoder, projector, decoder over the prompt, LM head positions kept).
        decode: every decode step together (decoder over one new token each, LM head at that token).
        vision: the vision encoder's FLOPs by part (``vision.total == prefill.vision_tower``).
        layer: the withdrawal layer ``K`` (``None``: no withdrawal; for another method its first stage),
            num_layers: ``L``.
        vision_tokens, text_tokens, generated_tokens, decode_steps: the token counts used.
        prefill_decoder_tokens: tokens each decoder layer processes in prefill (``L`` entries).
    """

    prefill: PhaseFlops
    decode: PhaseFlops
    vision: VisionFlops
    layer: int | None
    num_layers: int
    vision_tokens: int
    text_tokens: int
    generated_tokens: int
    decode_steps: int
    prefill_decoder_tokens: tuple[int, ...] = field(repr=False, default=())

    @property
    def total(self) -> int:
        return self.prefill.total + self.decode.total

    @property
    def tflops(self) -> float:
        return self.total / TERA

    @property
    def prefill_tflops(self) -> float:
        return self.prefill.total / TERA

    @property
    def decode_tflops(self) -> float:
        return self.decode.total / TERA

    def by_component(self) -> dict[str, int]:
        """Prefill + decode FLOPs per component."""
        return {name: getattr(self.prefill, name) + getattr(self.decode, name) for name in COMPONENTS}

    def to_dict(self) -> dict:
        """Flat JSON-ready dict: totals, TFLOPs, and ``prefill_<component>`` / ``decode_<component>`` FLOPs."""
        out = {
            "layer": self.layer,
            "num_layers": self.num_layers,
            "vision_tokens": self.vision_tokens,
            "text_tokens": self.text_tokens,
            "generated_tokens": self.generated_tokens,
            "flops": self.total,
            "tflops": self.tflops,
            "prefill_tflops": self.prefill_tflops,
            "decode_tflops": self.decode_tflops,
        }
        for phase in ("prefill", "decode"):
            for name, value in asdict(getattr(self, phase)).items():
                out[f"{phase}_{name}"] = value
        return out


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``; ``ValueError`` naming it otherwise (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------------------------------- vision
def _vit_blocks(
    v: VisionDims, tokens: int, segments_full: Sequence[int], segments_window: Sequence[int] | None = None
) -> VisionFlops:
    """All blocks of a ViT over ``tokens`` tokens; attention runs within each segment (image, frame or window).

    ``segments_window`` (Qwen2.5-VL) is used by the blocks not listed in ``full_attention_blocks``.
    """
    d, i = v.hidden, v.intermediate
    proj_per_block = 2 * tokens * d * 4 * d  # qkv (d -> 3d) and out (d -> d)
    mlp_per_block = 2 * tokens * d * i * (3 if v.gated_mlp else 2)
    full = 4 * d * sum(s * s for s in segments_full)
    if segments_window is None:
        scores = v.layers * full
    else:
        window = 4 * d * sum(s * s for s in segments_window)
        n_full = sum(1 for b in v.full_attention_blocks if 0 <= b < v.layers)
        scores = n_full * full + (v.layers - n_full) * window
    return VisionFlops(attention_proj=v.layers * proj_per_block, attention_scores=scores, mlp=v.layers * mlp_per_block)


def _qwen_windows(v: VisionDims, t: int, h: int, w: int) -> list[int]:
    """Qwen2.5-VL window lengths (in patches) of one ``(t, h, w)`` grid: windows of ``window_patches`` merged units a
    side, tiled from the top-left, clipped at the bottom/right edge, per frame."""
    m, win = v.spatial_merge, v.window_patches
    mh, mw = h // m, w // m
    heights = [min(win, mh - r) for r in range(0, mh, win)]
    widths = [min(win, mw - c) for c in range(0, mw, win)]
    return [a * b * m * m for _ in range(t) for a in heights for b in widths]


def _pooling_head(v: VisionDims) -> int:
    """SigLIP attention-pooling head over one input of ``S`` tokens: a single probe query. q and out projections
    (1 token), k and v projections (S tokens), scores and weighted sum (1 x S), then the MLP on the pooled token."""
    d, s = v.hidden, v.tokens_per_input
    return 2 * d * d * 2 + 2 * s * d * d * 2 + 4 * s * d + 2 * d * v.intermediate * 2


def _vision_flops(arch: Architecture, work: VisionWorkload) -> tuple[VisionFlops, int]:
    """Encoder FLOPs and projector FLOPs of one sample's workload."""
    v = arch.vision
    if arch.is_qwen:
        patches = sum(t * h * w for t, h, w in work.grids)
        frames = [h * w for t, h, w in work.grids for _ in range(t)]
        windows = None
        if v.kind == "qwen2_5_vl":
            windows = [s for t, h, w in work.grids for s in _qwen_windows(v, t, h, w)]
        blocks = _vit_blocks(v, patches, frames, windows)
        embed = 2 * patches * v.patch_numel * v.hidden
        projector = (patches // v.spatial_merge**2) * arch.projector.flops_per_token()
        head = 0
    else:
        passes = work.image_inputs + work.video_frames
        seq = v.tokens_per_input
        blocks = _vit_blocks(v, passes * seq, [seq] * passes)
        embed = 2 * passes * v.patches_per_input * v.patch_numel * v.hidden
        head = passes * _pooling_head(v) if v.pooling_head else 0
        rules = arch.tokens
        rows = work.image_inputs * rules.image_projector_tokens + work.video_frames * (
            rules.video_projector_tokens or 0
        )
        projector = rows * arch.projector.flops_per_token()
    vision = VisionFlops(embed, blocks.attention_proj, blocks.attention_scores, blocks.mlp, head)
    return vision, projector


def _check_workload(arch: Architecture, work: VisionWorkload, vision_tokens: int) -> None:
    """Refuse a workload that cannot have produced ``vision_tokens`` decoder tokens (where that is determined)."""
    if arch.is_qwen:
        for g in work.grids:
            if len(g) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in g):
                raise ValueError(f"vision_grids entries must be (t, h, w) positive ints, got {g!r}")
            if g[1] % arch.vision.spatial_merge or g[2] % arch.vision.spatial_merge:
                raise ValueError(
                    f"grid {g}: h and w must be multiples of spatial_merge_size={arch.vision.spatial_merge}"
                )
        made = sum(t * h * w for t, h, w in work.grids) // arch.vision.spatial_merge**2
        if made != vision_tokens:
            raise ValueError(
                f"{arch.display}: vision_grids {list(work.grids)} give {made} vision tokens, not vision_tokens={vision_tokens}"
            )
        return
    if work.video_frames and arch.tokens.video_projector_tokens is None:
        raise ValueError(f"{arch.display} takes no video: video_frames must be 0, got {work.video_frames}")
    if arch.anyres:
        return  # tokens per crop depend on the image size: not checkable from counts
    made = work.image_inputs * arch.tokens.image_decoder_tokens + work.video_frames * (
        arch.tokens.video_decoder_tokens or 0
    )
    if made != vision_tokens:
        raise ValueError(
            f"{arch.display}: {work.image_inputs} image(s) and {work.video_frames} video frame(s) give {made} vision "
            f"tokens, not vision_tokens={vision_tokens}"
        )


def resolve_workload(
    arch: Architecture,
    vision_tokens: int,
    vision_inputs: int | None,
    video_frames: int,
    vision_grids: Sequence[Sequence[int]] | None,
    videos: int | None = None,
) -> VisionWorkload:
    """The sample's :class:`VisionWorkload` from the ``count_flops`` arguments (defaults filled in where determined)."""
    video_frames = check_count(video_frames, "video_frames")
    if arch.is_qwen:
        if vision_inputs not in (None, 0) or video_frames:
            raise ValueError(
                f"{arch.display}: give the encoder work as vision_grids=[(t, h, w), ...], not vision_inputs/video_frames"
            )
        if vision_grids is None:
            if vision_tokens:
                raise ValueError(
                    f"{arch.display}: the encoder cost depends on the patch grids; pass vision_grids=[(t, h, w), ...] "
                    "(the rows of image_grid_thw / video_grid_thw), or get them from vtw.flops.image_layout"
                )
            vision_grids = ()
        grids = tuple(tuple(g) for g in vision_grids)
        work = VisionWorkload(grids=grids)
    else:
        if vision_grids:
            raise ValueError(f"{arch.display} has a fixed-resolution encoder: vision_grids is for the Qwen families")
        if vision_inputs is None:
            rest = vision_tokens - video_frames * (arch.tokens.video_decoder_tokens or 0)
            if arch.anyres and rest:
                raise ValueError(
                    f"{arch.display}: the number of vision-tower crops depends on the image size; pass "
                    "vision_inputs=<crops run through the tower>, or get it from vtw.flops.image_layout"
                )
            per = arch.tokens.image_decoder_tokens or 1
            if rest % per:
                raise ValueError(
                    f"{arch.display}: vision_tokens={vision_tokens} is not a whole number of images of {per} tokens "
                    f"(plus {video_frames} video frame(s)); pass vision_inputs explicitly"
                )
            vision_inputs = rest // per
        vision_inputs = check_count(vision_inputs, "vision_inputs")
        work = VisionWorkload(image_inputs=vision_inputs, video_frames=video_frames, videos=videos or 0)
    _check_workload(arch, work, vision_tokens)
    return work


# -------------------------------------------------------------------------------------------------- decoder
def reduction_method(layer: int | None = None, method: Reduction | None = None) -> Reduction:
    """The method a count is for: ``method`` (a :class:`vtw.methods.Reduction`), or VTW at ``layer``."""
    if method is None:
        return Withdrawal(layer=layer)
    if layer is not None:
        raise ValueError(f"give the layer to the method ({method!r}), not layer={layer!r} as well")
    if not isinstance(method, Reduction):
        raise ValueError(f"method must be a vtw.methods.Reduction (e.g. make_method('fastv', layer=2)), got {method!r}")
    return method


def resolved_method(layer: int | None, method: Reduction | None, num_layers: int) -> tuple[Reduction, int | None]:
    """``(the method counted, the layer reported)``: ``method`` resolved against ``L`` and its first stage, or VTW at
    ``layer`` (checked) and ``layer``."""
    layer = validate_layer(layer, num_layers)
    if method is None:
        return Withdrawal(layer=layer), layer
    method = reduction_method(layer, method).resolve(num_layers)
    return method, next(iter(method.stages()), None)


def prefill_layer_tokens(num_layers: int, vision: int, text: int, method: Reduction, layout=None) -> list[int]:
    """Tokens each decoder layer ``0..L-1`` processes in the prefill of one sample under ``method`` (``layout``: the
    sample's :class:`vtw.grids.SampleLayout`, for the methods acting before the decoder)."""
    return [v + t for v, t in method.layer_tokens(num_layers, vision, text, layout)]


def checked_layer_tokens(layer_tokens, num_layers: int) -> list[tuple[int, int]]:
    """``layer_tokens`` as ``[(vision, text)] * L`` ints, else ``ValueError`` naming what is wrong."""
    pairs = [tuple(int(x) for x in pair) for pair in layer_tokens]
    if len(pairs) != num_layers or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(
            f"layer_tokens must give one (vision, text) pair of counts >= 0 per decoder layer ({num_layers}), "
            f"got {list(layer_tokens)!r}"
        )
    return pairs


def sample_layout(config, method: Reduction, vision_tokens: int, layout=None, **counts):
    """The layout a count of ``method`` needs: ``layout`` as given, else (methods acting before the decoder only)
    the one the counts determine (:func:`vtw.grids.counted_layout`); ``None`` for the other methods."""
    if layout is not None or not method.before_decoder or not method.stages():
        return layout
    return counted_layout(config, vision_tokens, **counts)


def _layer_linear(dec: DecoderDims, tokens: int) -> tuple[int, int]:
    """(attention projections, MLP) FLOPs of one decoder layer over ``tokens`` tokens."""
    d, hd = dec.hidden, dec.head_dim
    proj = 2 * tokens * d * hd * (2 * dec.heads + 2 * dec.kv_heads)  # q and o: H heads; k and v: G heads
    mlp = 2 * tokens * d * dec.intermediate * 3  # gate, up, down
    return proj, mlp


def _scores(dec: DecoderDims, queries: int, keys: int) -> int:
    return 4 * queries * keys * dec.heads * dec.head_dim  # Q K^T and A V


def count_flops(
    config,
    *,
    vision_tokens: int,
    text_tokens: int,
    generated_tokens: int = 0,
    layer: int | None = None,
    vision_inputs: int | None = None,
    video_frames: int = 0,
    vision_grids: Sequence[Sequence[int]] | None = None,
    prefill_logits: int | str = 1,
    method: Reduction | None = None,
    vision_layout: SampleLayout | None = None,
    layer_tokens: Sequence[Sequence[int]] | None = None,
) -> FlopsReport:
    """Matmul FLOPs of one sample (no padding), by component and phase.

    Args:
        config: a transformers config of a supported family (``model.config``).
        vision_tokens: vision (image + video placeholder) tokens in the prompt, ``V``.
        text_tokens: the other prompt tokens, ``T`` (>= 1).
        generated_tokens: new tokens produced, ``G``; ``generate`` runs the prefill (which yields the first) and
            ``G - 1`` decode steps.
        layer: withdrawal layer ``K`` in ``[0, L]`` (``None`` or ``L``: no withdrawal). Layers ``>= K`` process the
            ``T`` text tokens in prefill and attend over text (and generated) keys only in decode.
        method: another reduction (:class:`vtw.methods.Reduction`, e.g. ``make_method("fastv", layer=2)``) instead
            of VTW at ``layer``: each layer processes the tokens ``method.layer_tokens`` says, and the method's own
            attention scoring (FastV, PyramidDrop) is counted in ``prefill.reduction``.
        vision_inputs: fixed-resolution encoder passes for images (images, or anyres crops). Derived from
            ``vision_tokens`` for LLaVA-1.5 and Video-LLaVA; required for the anyres families.
        video_frames: video frames through a fixed-resolution encoder.
        vision_grids: Qwen families: ``(t, h, w)`` patch grid of every image and video (``image_grid_thw`` rows).
        vision_layout: the sample's image and video grids (:class:`vtw.grids.SampleLayout`), which methods acting
            before the decoder (``pool``, ``visionzip``) need; derived from the counts where they determine it
            (LLaVA-1.5, Video-LLaVA, the Qwen grids), required for anyres images.
        layer_tokens: the realized ``(vision, text)`` tokens each decoder layer ``0..L-1`` processed in this sample's
            prefill (a run's :attr:`vtw.WithdrawalHandle.last_layer_tokens` row), for methods whose counts depend on
            the data; ``None``: the counts ``method`` declares (:meth:`~vtw.methods.Reduction.layer_tokens`).
        prefill_logits: positions whose logits the prefill computes: 1 (``generate``, ``logits_to_keep=1``), any
            count up to the decoder's output length, or ``"all"`` (a plain forward: every position the last layer
            outputs, ``V + T``, or ``T`` under withdrawal).

    Raises:
        ValueError: unsupported family, negative or non-integer counts, ``layer`` out of range, a family (or
            videos) the method cannot act on (:meth:`~vtw.methods.Reduction.check_supported`), or an encoder
            workload inconsistent with ``vision_tokens``.
    """
    arch = architecture(config)
    dec = arch.decoder
    vision_tokens = check_count(vision_tokens, "vision_tokens")
    text_tokens = check_count(text_tokens, "text_tokens", minimum=1)
    generated_tokens = check_count(generated_tokens, "generated_tokens")
    method, layer = resolved_method(layer, method, dec.num_layers)
    work = resolve_workload(arch, vision_tokens, vision_inputs, video_frames, vision_grids)
    # a model the method cannot act on has no count: the refusal withdraw() gives
    videos = work.video_frames or (vision_layout is not None and vision_layout.videos)
    method.check_supported(config, video=bool(videos))

    full = vision_tokens + text_tokens
    layout = sample_layout(
        config, method, vision_tokens, vision_layout, video_frames=work.video_frames, videos=work.videos,
        qwen_grids=work.grids,
    )  # fmt: skip
    if layer_tokens is None:
        layer_pairs = method.layer_tokens(dec.num_layers, vision_tokens, text_tokens, layout)
    else:
        layer_pairs = checked_layer_tokens(layer_tokens, dec.num_layers)
    pre_tokens = [v + t for v, t in layer_pairs]
    out_positions = pre_tokens[-1]
    if prefill_logits == "all":
        prefill_logits = out_positions
    prefill_logits = check_count(prefill_logits, "prefill_logits")
    if prefill_logits > out_positions:
        raise ValueError(f"prefill_logits={prefill_logits} exceeds the {out_positions} positions the decoder outputs")

    vision, projector = _vision_flops(arch, work)
    if method.acts_in == "vision_encoder" and method.stages():  # the projector runs on the tokens kept
        rows = layer_pairs[0][0] - sum(method.unprojected_tokens(g) for g in layout.grids)
        projector = rows * arch.projector.flops_per_token()
    pre_proj = pre_mlp = pre_scores = 0
    for n in pre_tokens:
        proj, mlp = _layer_linear(dec, n)
        pre_proj, pre_mlp, pre_scores = pre_proj + proj, pre_mlp + mlp, pre_scores + _scores(dec, n, n)
    scoring = sum(
        last_token_attention_flops(dec.hidden, dec.heads, dec.kv_heads, dec.head_dim, full if j < 0 else pre_tokens[j])
        for j in method.scored_inputs(dec.num_layers)
    )
    if method.stages():
        scoring += method.scoring_flops(config, layout, layer_pairs)
    head = 2 * dec.hidden * dec.vocab
    prefill = PhaseFlops(
        reduction=scoring,
        vision_tower=vision.total,
        projector=projector,
        decoder_attention_proj=pre_proj,
        decoder_attention_scores=pre_scores,
        decoder_mlp=pre_mlp,
        lm_head=prefill_logits * head,
    )

    steps = max(generated_tokens - 1, 0)
    proj1, mlp1 = _layer_linear(dec, 1)
    # step j = 1..steps feeds generated token j; a layer that cached `c` prompt tokens attends over c + j keys.
    keys = sum(steps * c + steps * (steps + 1) // 2 for c in pre_tokens)
    decode = PhaseFlops(
        decoder_attention_proj=steps * dec.num_layers * proj1,
        decoder_attention_scores=_scores(dec, 1, 1) * keys,
        decoder_mlp=steps * dec.num_layers * mlp1,
        lm_head=steps * head,
    )
    return FlopsReport(
        prefill=prefill,
        decode=decode,
        vision=vision,
        layer=layer,
        num_layers=dec.num_layers,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        generated_tokens=generated_tokens,
        decode_steps=steps,
        prefill_decoder_tokens=tuple(pre_tokens),
    )
