"""Exact matmul FLOPs of one sample: vision encoder, projector, decoder prefill and every decode step.

See the package docstring (:mod:`vtw.flops`) for what is counted. All arithmetic is on Python ints (exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from ..arch import Architecture, DecoderDims, VisionDims, architecture
from ..grids import counted_layout
from ..methods import Reduction, Withdrawal
from ..methods.attention import last_token_attention_flops
from ..workload import SampleCounts, VisionWorkload, check_count

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


def _pooling_head(v: VisionDims) -> int:
    """SigLIP attention-pooling head over one input of ``S`` tokens: a single probe query. q and out projections
    (1 token), k and v projections (S tokens), scores and weighted sum (1 x S), then the MLP on the pooled token."""
    d, s = v.hidden, v.tokens_per_input
    return 2 * d * d * 2 + 2 * s * d * d * 2 + 4 * s * d + 2 * d * v.intermediate * 2


def _vision_flops(
    arch: Architecture, work: VisionWorkload, method: Reduction, layout, first_layer_vision: int
) -> tuple[VisionFlops, int]:
    """Encoder FLOPs and projector FLOPs of one sample's workload (what runs: :meth:`vtw.layouts.Layout.tower`);
    under a method acting in the vision encoder, the projector runs on the tokens it keeps: the vision tokens of the
    first decoder layer (``first_layer_vision``) that are projector rows."""
    v = arch.vision
    runs = arch.layout.tower(arch, work)
    blocks = _vit_blocks(v, runs.tokens, runs.segments, runs.windows)
    embed = 2 * runs.patches * v.patch_numel * v.hidden
    head = runs.passes * _pooling_head(v) if v.pooling_head else 0
    rows = runs.projector_rows
    if method.acts_in == "vision_encoder" and method.stages():
        rows = first_layer_vision - sum(method.unprojected_tokens(g) for g in layout.grids)
    projector = rows * arch.projector.flops_per_token()
    return VisionFlops(embed, blocks.attention_proj, blocks.attention_scores, blocks.mlp, head), projector


def resolve_workload(arch: Architecture, sample: SampleCounts) -> VisionWorkload:
    """The sample's :class:`VisionWorkload` (defaults filled in where determined), checked against its vision tokens
    (:meth:`vtw.layouts.Layout.workload`)."""
    return arch.layout.workload(arch, sample)


# -------------------------------------------------------------------------------------------------- decoder
def resolved_method(method: Reduction | None, num_layers: int) -> tuple[Reduction, int | None]:
    """``(the method counted, the layer reported)``: ``method`` resolved against ``L`` and its first stage (``None``:
    the full model, VTW with nothing withdrawn, and no layer)."""
    if method is None:
        return Withdrawal(), None
    if not isinstance(method, Reduction):
        raise ValueError(f"method must be a vtw.methods.Reduction (e.g. make_method('fastv', layer=2)), got {method!r}")
    method = method.resolve(num_layers)
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


def sample_layout(config, method: Reduction, sample: SampleCounts, work: VisionWorkload | None = None):
    """The layout a count of ``method`` needs: the sample's ``vision_layout`` as given, else (methods acting before
    the decoder only) the one its counts determine (:func:`vtw.grids.counted_layout`, from ``work``: its resolved
    workload); ``None`` for the other methods."""
    layout = sample.vision_layout
    if layout is not None or not method.before_decoder or not method.stages():
        return layout
    if work is None:
        return counted_layout(config, sample.vision_tokens)
    return counted_layout(
        config, sample.vision_tokens, video_frames=work.video_frames, videos=work.videos, qwen_grids=work.grids
    )


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
    sample: SampleCounts,
    method: Reduction | None = None,
    *,
    prefill_logits: int | str = 1,
    layer_tokens: Sequence[Sequence[int]] | None = None,
) -> FlopsReport:
    """Matmul FLOPs of one sample (no padding), by component and phase.

    Args:
        config: a transformers config of a supported family (``model.config``).
        sample: the sample's counts (:class:`vtw.flops.SampleCounts`: vision, text and generated tokens, encoder
            work, grids).
        method: the reduction counted (:class:`vtw.methods.Reduction`, e.g. ``Withdrawal(layer=16)`` or
            ``make_method("fastv", layer=2)``; ``None``: the full model). Each layer processes the tokens
            ``method.layer_tokens`` says (under VTW at ``K``: layers ``>= K`` the ``T`` text tokens in prefill, and
            text and generated keys only in decode), and the method's own attention scoring (FastV, PyramidDrop) is
            counted in ``prefill.reduction``.
        layer_tokens: the realized ``(vision, text)`` tokens each decoder layer ``0..L-1`` processed in this sample's
            prefill (a run's :attr:`vtw.WithdrawalHandle.last_layer_tokens` row), for methods whose counts depend on
            the data; ``None``: the counts ``method`` declares (:meth:`~vtw.methods.Reduction.layer_tokens`).
        prefill_logits: positions whose logits the prefill computes: 1 (``generate``, ``logits_to_keep=1``), any
            count up to the decoder's output length, or ``"all"`` (a plain forward: every position the last layer
            outputs, ``V + T``, or ``T`` under withdrawal).

    Raises:
        ValueError: unsupported family, negative or non-integer counts, a layer out of range, a family (or
            videos) the method cannot act on (:meth:`~vtw.methods.Reduction.check_supported`), or an encoder
            workload inconsistent with ``vision_tokens``.
    """
    arch = architecture(config)
    dec = arch.decoder
    sample = sample.checked()
    method, layer = resolved_method(method, dec.num_layers)
    work = resolve_workload(arch, sample)
    # a model the method cannot act on has no count: the refusal withdraw() gives
    videos = work.video_frames or (sample.vision_layout is not None and sample.vision_layout.videos)
    method.check_supported(config, video=bool(videos))
    layout = sample_layout(config, method, sample, work)
    pairs = _layer_pairs(dec.num_layers, method, sample, layout, layer_tokens)
    pre_tokens = [v + t for v, t in pairs]
    vision, projector = _vision_flops(arch, work, method, layout, pairs[0][0])
    logits = _prefill_logits(prefill_logits, pre_tokens[-1])
    reduction = _scoring(config, dec, method, sample, layout, pairs)
    prefill = replace(
        _prefill(dec, pre_tokens, logits), vision_tower=vision.total, projector=projector, reduction=reduction
    )
    return FlopsReport(
        prefill=prefill,
        decode=_decode(dec, pre_tokens, sample.generated_tokens),
        vision=vision,
        layer=layer,
        num_layers=dec.num_layers,
        vision_tokens=sample.vision_tokens,
        text_tokens=sample.text_tokens,
        generated_tokens=sample.generated_tokens,
        decode_steps=max(sample.generated_tokens - 1, 0),
        prefill_decoder_tokens=tuple(pre_tokens),
    )


def _layer_pairs(num_layers: int, method: Reduction, sample: SampleCounts, layout, layer_tokens) -> list:
    """``(vision, text)`` tokens of each decoder layer in prefill: the realized ``layer_tokens`` (checked), else
    those ``method`` declares."""
    if layer_tokens is not None:
        return checked_layer_tokens(layer_tokens, num_layers)
    return method.layer_tokens(num_layers, sample.vision_tokens, sample.text_tokens, layout)


def _prefill_logits(prefill_logits: int | str, out_positions: int) -> int:
    """The prefill's logit positions (``"all"``: every position the decoder outputs), checked against them."""
    if prefill_logits == "all":
        prefill_logits = out_positions
    prefill_logits = check_count(prefill_logits, "prefill_logits")
    if prefill_logits > out_positions:
        raise ValueError(f"prefill_logits={prefill_logits} exceeds the {out_positions} positions the decoder outputs")
    return prefill_logits


def _scoring(config, dec: DecoderDims, method: Reduction, sample: SampleCounts, layout, pairs) -> int:
    """The method's own work in prefill: last-token attention scoring of the inputs it scores, and its own
    :meth:`~vtw.methods.Reduction.scoring_flops`."""
    full = sample.vision_tokens + sample.text_tokens
    pre_tokens = [v + t for v, t in pairs]
    scoring = sum(
        last_token_attention_flops(dec.hidden, dec.heads, dec.kv_heads, dec.head_dim, full if j < 0 else pre_tokens[j])
        for j in method.scored_inputs(dec.num_layers)
    )
    if method.stages():
        scoring += method.scoring_flops(config, layout, pairs)
    return scoring


def _prefill(dec: DecoderDims, pre_tokens: Sequence[int], logits: int) -> PhaseFlops:
    """The decoder's prefill over ``pre_tokens[i]`` tokens in layer ``i`` and the LM head at ``logits`` positions."""
    proj = mlp = scores = 0
    for n in pre_tokens:
        p, m = _layer_linear(dec, n)
        proj, mlp, scores = proj + p, mlp + m, scores + _scores(dec, n, n)
    return PhaseFlops(
        decoder_attention_proj=proj, decoder_attention_scores=scores, decoder_mlp=mlp, lm_head=logits * _head(dec)
    )


def _decode(dec: DecoderDims, pre_tokens: Sequence[int], generated_tokens: int) -> PhaseFlops:
    """Every decode step: step ``j = 1..G-1`` feeds generated token ``j``; a layer that cached ``c`` prompt tokens
    attends over ``c + j`` keys."""
    steps = max(generated_tokens - 1, 0)
    proj1, mlp1 = _layer_linear(dec, 1)
    keys = sum(steps * c + steps * (steps + 1) // 2 for c in pre_tokens)
    return PhaseFlops(
        decoder_attention_proj=steps * dec.num_layers * proj1,
        decoder_attention_scores=_scores(dec, 1, 1) * keys,
        decoder_mlp=steps * dec.num_layers * mlp1,
        lm_head=steps * _head(dec),
    )


def _head(dec: DecoderDims) -> int:
    return 2 * dec.hidden * dec.vocab
