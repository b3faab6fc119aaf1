"""The planning table: FLOPs, paper-convention FLOPs and KV cache of one sample for every withdrawal layer ``K``.

:func:`flops_table` computes the rows; :func:`plan_flops` resolves a model name offline (shipped configs, no weights),
fills in a default sample (one image of :data:`~vtw.workload.DEFAULT_IMAGE_SIZE`, or the given token budget),
prints a rich table (:func:`print_plan`; rich is imported only then) and returns the rows. ``python run.py mode=flops
model=<name>`` calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ..arch import Architecture, architecture
from ..grids import counted_layout
from ..methods import Reduction, Withdrawal
from ..workload import DEFAULT_IMAGE_SIZE, SampleCounts, VisionWorkload, check_count, image_layout
from .configs import SHIPPED_CHECKPOINTS, load_model_config
from .count import TERA, count_flops
from .kv import kv_cache_bytes
from .paper import PAPER_CONVENTION, paper_flops

EXACT_CONVENTION = (
    "exact: matmul FLOPs as computed by transformers (1 multiply-add = 2 FLOPs): vision encoder + projector + "
    "decoder prefill + every decode step + LM head at the positions computed (1 in prefill, 1 per decode step)"
)


@dataclass(frozen=True)
class FlopsRow:
    """One withdrawal layer ``K`` (``K == num_layers``: vanilla, nothing withdrawn), or one setting of another method
    (``label``; ``layer``: its first stage)."""

    layer: int
    num_layers: int
    flops: int
    prefill_flops: int
    decode_flops: int
    saved_pct: float  # vs vanilla, exact figure
    paper_flops: int
    paper_saved_pct: float
    kv_bytes: int
    kv_saved_pct: float
    label: str = ""

    @property
    def vanilla(self) -> bool:
        return self.layer == self.num_layers

    tflops = property(lambda self: self.flops / TERA)
    prefill_tflops = property(lambda self: self.prefill_flops / TERA)
    decode_tflops = property(lambda self: self.decode_flops / TERA)
    paper_tflops = property(lambda self: self.paper_flops / TERA)


def _pct(value: int, base: int) -> float:
    return 100.0 * (1.0 - value / base) if base else 0.0


def flops_table(
    config,
    sample: SampleCounts,
    *,
    layers: Iterable[int] | None = None,
    dtype="bfloat16",
    prefill_logits: int | str = 1,
    methods: Sequence[Reduction] | None = None,
) -> list[FlopsRow]:
    """A :class:`FlopsRow` per withdrawal layer in ``layers`` (default: every ``K`` from ``L`` down to 0), or per
    method object in ``methods`` (another method's settings, e.g. :func:`method_settings`), for one ``sample``.

    ``prefill_logits`` is that of :func:`~vtw.flops.count_flops`, ``dtype`` that of :func:`~vtw.flops.kv_cache_bytes`.
    """
    num_layers = architecture(config).decoder.num_layers
    layers = list(range(num_layers, -1, -1)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers is empty: give at least one withdrawal layer")
    settings = [Withdrawal(layer=k) for k in layers] if methods is None else list(methods)
    if sample.vision_layout is None and any(m.before_decoder and m.stages() for m in settings):
        layout = counted_layout(
            config, sample.vision_tokens, video_frames=sample.video_frames, qwen_grids=sample.vision_grids or ()
        )
        sample = replace(sample, vision_layout=layout)
    base = _figures(config, sample, None, dtype, prefill_logits)
    return [_row(_figures(config, sample, m, dtype, prefill_logits), base, m, num_layers) for m in settings]


def _figures(config, sample: SampleCounts, method: Reduction | None, dtype, prefill_logits) -> tuple:
    """``(exact report, paper-convention FLOPs, KV bytes)`` of ``sample`` under ``method``."""
    exact = count_flops(config, sample, method, prefill_logits=prefill_logits)
    return exact, paper_flops(config, sample, method), kv_cache_bytes(config, sample, method, dtype=dtype).total


def _row(figures: tuple, base: tuple, method: Reduction, num_layers: int) -> FlopsRow:
    (rep, paper, kv), (base_rep, base_paper, base_kv) = figures, base
    return FlopsRow(
        layer=num_layers if rep.layer is None else rep.layer,
        label="" if isinstance(method, Withdrawal) else method.label,
        num_layers=num_layers,
        flops=rep.total,
        prefill_flops=rep.prefill.total,
        decode_flops=rep.decode.total,
        saved_pct=_pct(rep.total, base_rep.total),
        paper_flops=paper,
        paper_saved_pct=_pct(paper, base_paper),
        kv_bytes=kv,
        kv_saved_pct=_pct(kv, base_kv),
    )


def method_settings(method: Reduction, num_layers: int, rows: int = 10) -> list[Reduction]:
    """``method`` itself, then ``rows`` of its settings along its free parameter (evenly spread over
    :meth:`~vtw.methods.Reduction.budget_candidates`, the most compute first): a planning table for one method."""
    method = method.resolve(num_layers)
    cands = [c for c in method.budget_candidates(num_layers)[::-1] if any(k < num_layers for k in c.stages())]
    if len(cands) > rows:
        cands = [cands[round(i * (len(cands) - 1) / (rows - 1))] for i in range(rows)]
    return [method, *[c for c in cands if c != method]]


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan_flops` computed and printed."""

    model: str
    family: str
    vision_tokens: int
    text_tokens: int
    generated_tokens: int
    workload: VisionWorkload
    encoder_note: str
    rows: list[FlopsRow]


def _video_sample(arch: Architecture, frames: int) -> tuple[int, VisionWorkload, str]:
    """:func:`_plan_sample` for one video of ``frames`` frames through a fixed-resolution family."""
    frames = check_count(frames, "video_frames")
    per = arch.layout.video_frame_tokens(arch)
    if per is None:
        raise ValueError(
            f"{arch.display}: video_frames={frames} needs a fixed-resolution video family (Video-LLaVA, "
            "LLaVA-NeXT-Video, LLaVA-OneVision); for Qwen give vision_tokens"
        )
    tokens = frames * per + arch.tokens.video_extra_tokens
    return (
        tokens,
        VisionWorkload(video_frames=frames, videos=1),
        f"one video of {frames} frames, {per} tokens per frame",
    )


def _plan_sample(
    config, vision_tokens: int | None, text_tokens: int, generated_tokens: int, image_size, video_frames: int = 0
) -> tuple[SampleCounts, VisionWorkload, str]:
    """The sample counted, its workload and a note on how it was chosen; with ``video_frames``, one video of that
    many frames (and no image)."""
    arch = architecture(config)
    tokens = {"text_tokens": text_tokens, "generated_tokens": generated_tokens}
    if video_frames:
        v, work, note = _video_sample(arch, video_frames)
        return SampleCounts.of(work, v, **tokens), work, note
    image = image_layout(config, image_size or DEFAULT_IMAGE_SIZE)
    h, w = image.image_size
    if vision_tokens is None:  # the image's grids where counts cannot give them, for the methods acting on them
        grids = arch.layout.image_sample(config, h, w)
        note = f"one {w}x{h} (WxH) image: {image.note}"
        return SampleCounts.of(image.workload, image.vision_tokens, **tokens, vision_layout=grids), image.workload, note
    vision_tokens = check_count(vision_tokens, "vision_tokens")
    work, note = VisionWorkload(), "no image (text only)"
    if vision_tokens:
        work, note = arch.layout.planned(arch, vision_tokens, image)
    return SampleCounts.of(work, vision_tokens, **tokens), work, note


def plan_flops(
    model_config_path_or_name,
    *,
    vision_tokens: int | None = None,
    text_tokens: int,
    generated_tokens: int,
    layers: Iterable[int] | None = None,
    image_size: tuple[int, int] | None = None,
    video_frames: int = 0,
    dtype="bfloat16",
    console=None,
    method: Reduction | None = None,
) -> PlanResult:
    """Print the FLOPs / KV table of one sample for every withdrawal layer (or for ``method``'s settings,
    :func:`method_settings`); no weights are needed.

    Args:
        model_config_path_or_name: a shipped name (``llava-1.5-7b``, ...), its hub id, an embedded model
            (``tiny-llava``), a path to a ``config.json``, or a config object.
        vision_tokens: decoder vision tokens. Default: those of one image of ``image_size`` (default 640x480 WxH):
            576 for LLaVA-1.5, 256 for Video-LLaVA, the anyres tiling for LLaVA-NeXT / -OneVision / -NeXT-Video,
            ``smart_resize`` for Qwen. Given explicitly for an anyres family, the encoder work stays that of the
            image; for Qwen, one image with a near-square patch grid of that many tokens is assumed.
        text_tokens, generated_tokens: the rest of the token budget (``generated_tokens >= 1`` for generation).
        layers: withdrawal layers to list (default every ``K`` from ``L`` down to 0).
        image_size: ``(height, width)`` in pixels of the default image.
        video_frames: > 0: the sample is one video of that many frames instead (fixed-resolution video families:
            ``frames x`` the family's tokens per frame, every frame through the video tower).
        dtype: KV-cache element type.
        console: a ``rich.console.Console`` (default: a new one on stdout).

    Raises:
        ValueError: unknown model (listing the shipped ones) or bad counts, before anything is printed.
    """
    config = load_model_config(model_config_path_or_name)
    arch = architecture(config)
    sample, work, note = _plan_sample(config, vision_tokens, text_tokens, generated_tokens, image_size, video_frames)
    methods = None
    if method is not None and method.name != "vtw":
        methods = [Withdrawal(), *method_settings(method, arch.decoder.num_layers)]
    rows = flops_table(config, sample, layers=layers, dtype=dtype, methods=methods)
    if methods is not None:
        rows = _distinct_settings(rows)
    name = str(model_config_path_or_name) if not hasattr(model_config_path_or_name, "to_dict") else arch.display
    tokens = (sample.vision_tokens, text_tokens, generated_tokens)
    result = PlanResult(name, arch.display, *tokens, workload=work, encoder_note=note, rows=rows)
    print_plan(result, arch=arch, hub_id=SHIPPED_CHECKPOINTS.get(name), dtype=str(dtype), console=console)
    return result


def _distinct_settings(rows: list[FlopsRow]) -> list[FlopsRow]:
    """A method's settings without those that cost what an earlier row costs (e.g. a pool window wider than the grid,
    a VisionZip count above the tower's patches); vanilla and the given setting (the first two rows) stay."""
    seen = {rows[0].flops, rows[1].flops}
    kept = rows[:2]
    for r in rows[2:]:
        if r.flops not in seen:
            seen.add(r.flops)
            kept.append(r)
    return kept


# ------------------------------------------------------------------------------------------------ printing
_MIB = 2**20


def render_flops_table(rows: Sequence[FlopsRow], *, title: str | None = None):
    """A ``rich.table.Table`` with one line per withdrawal layer: exact TFLOPs (total, prefill, decode) and % saved, the
    papers' TFLOPs and % saved, and the KV cache (MiB, % saved). The vanilla row (``K = L``) is labelled."""
    from rich.table import Table  # rich is only needed to print

    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("K" if not any(r.label for r in rows) else "setting", justify="right")
    table.add_column("TFLOPs\n(exact)", justify="right")
    table.add_column("prefill", justify="right")
    table.add_column("decode", justify="right")
    table.add_column("saved", justify="right")
    table.add_column("TFLOPs\n(paper)", justify="right")
    table.add_column("saved\n(paper)", justify="right")
    table.add_column("KV MiB", justify="right")
    table.add_column("KV saved", justify="right")
    for r in rows:
        label = f"{r.layer} (vanilla)" if r.vanilla else (r.label or str(r.layer))
        table.add_row(
            label,
            f"{r.tflops:.3f}",
            f"{r.prefill_tflops:.3f}",
            f"{r.decode_tflops:.3f}",
            f"{r.saved_pct:.1f}%",
            f"{r.paper_tflops:.3f}",
            f"{r.paper_saved_pct:.1f}%",
            f"{r.kv_bytes / _MIB:.1f}",
            f"{r.kv_saved_pct:.1f}%",
            style="bold" if r.vanilla else None,
        )
    return table


def print_plan(result: PlanResult, *, arch: Architecture, hub_id: str | None, dtype: str, console=None) -> None:
    """Print the header (model, sample), the table and the conventions of :func:`plan_flops` on ``console`` (a
    ``rich.console.Console``, default: a new one on stdout)."""
    if console is None:
        from rich.console import Console

        console = Console()
    d = arch.decoder
    name = f"{result.model} ({hub_id})" if hub_id else result.model
    console.print(
        f"[bold]{name}[/bold]: {result.family}, decoder L={d.num_layers} d={d.hidden} m={d.intermediate} "
        f"heads={d.heads}/{d.kv_heads} kv, vocab={d.vocab}"
    )
    steps = max(result.generated_tokens - 1, 0)
    console.print(
        f"sample: {result.vision_tokens} vision tokens ({result.encoder_note}), {result.text_tokens} text tokens, "
        f"{result.generated_tokens} generated tokens (prefill + {steps} decode steps); KV cache in {dtype}"
    )
    by = "setting" if any(r.label for r in result.rows) else "withdrawal layer K"
    console.print(render_flops_table(result.rows, title=f"FLOPs per sample by {by}"))
    console.print(f"[dim]{EXACT_CONVENTION}.[/dim]")
    console.print(f"[dim]paper: {PAPER_CONVENTION}; layers >= K see the text tokens only.[/dim]")


__all__ = [
    "EXACT_CONVENTION",
    "PAPER_CONVENTION",
    "FlopsRow",
    "PlanResult",
    "flops_table",
    "plan_flops",
    "print_plan",
    "render_flops_table",
]
