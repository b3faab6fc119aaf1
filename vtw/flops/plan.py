"""The planning table: FLOPs, paper-convention FLOPs and KV cache of one sample for every withdrawal layer ``K``.

:func:`flops_table` computes the rows; :func:`plan_flops` resolves a model name offline (shipped configs, no weights),
fills in a default sample (one image of :data:`~vtw.flops.layout.DEFAULT_IMAGE_SIZE`, or the given token budget),
prints a rich table (:func:`print_plan`; rich is imported only then) and returns the rows. ``python run.py mode=flops
model=<name>`` calls it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..grids import SampleLayout, counted_layout, image_grids
from ..methods import Reduction, Withdrawal
from .arch import Architecture, architecture
from .configs import SHIPPED_CHECKPOINTS, load_model_config
from .count import TERA, check_count, count_flops
from .kv import kv_cache_bytes
from .layout import DEFAULT_IMAGE_SIZE, VisionWorkload, image_layout
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

    @property
    def tflops(self) -> float:
        return self.flops / TERA

    @property
    def prefill_tflops(self) -> float:
        return self.prefill_flops / TERA

    @property
    def decode_tflops(self) -> float:
        return self.decode_flops / TERA

    @property
    def paper_tflops(self) -> float:
        return self.paper_flops / TERA


def _pct(value: int, base: int) -> float:
    return 100.0 * (1.0 - value / base) if base else 0.0


def flops_table(
    config,
    *,
    vision_tokens: int,
    text_tokens: int,
    generated_tokens: int,
    layers: Iterable[int] | None = None,
    vision_inputs: int | None = None,
    video_frames: int = 0,
    vision_grids: Sequence[Sequence[int]] | None = None,
    dtype="bfloat16",
    prefill_logits: int | str = 1,
    methods: Sequence[Reduction] | None = None,
    vision_layout: SampleLayout | None = None,
) -> list[FlopsRow]:
    """A :class:`FlopsRow` per withdrawal layer in ``layers`` (default: every ``K`` from ``L`` down to 0), or per
    method object in ``methods`` (another method's settings, e.g. :func:`method_settings`).

    The other arguments are those of :func:`~vtw.flops.count_flops` and :func:`~vtw.flops.kv_cache_bytes`.
    """
    num_layers = architecture(config).decoder.num_layers
    layers = list(range(num_layers, -1, -1)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers is empty: give at least one withdrawal layer")
    settings = [Withdrawal(layer=k) for k in layers] if methods is None else list(methods)
    common = {"vision_tokens": vision_tokens, "text_tokens": text_tokens}
    encoder = {"vision_inputs": vision_inputs, "video_frames": video_frames, "vision_grids": vision_grids}
    if vision_layout is None and any(m.before_decoder and m.stages() for m in settings):
        vision_layout = counted_layout(config, vision_tokens, video_frames=video_frames, qwen_grids=vision_grids or ())
    grids = {"vision_layout": vision_layout}

    def exact(m):
        return count_flops(
            config, **common, generated_tokens=generated_tokens, method=m, prefill_logits=prefill_logits, **encoder,
            **grids,
        )  # fmt: skip

    base = exact(None)
    base_paper = paper_flops(config, **common, layer=None)
    base_kv = kv_cache_bytes(config, **common, generated_tokens=generated_tokens, layer=None, dtype=dtype).total
    rows = []
    for m in settings:
        rep = exact(m)
        paper = paper_flops(config, **common, method=m, **grids)
        kv = kv_cache_bytes(config, **common, generated_tokens=generated_tokens, method=m, dtype=dtype, **grids).total
        rows.append(
            FlopsRow(
                layer=num_layers if rep.layer is None else rep.layer,
                label="" if isinstance(m, Withdrawal) else m.label,
                num_layers=num_layers,
                flops=rep.total,
                prefill_flops=rep.prefill.total,
                decode_flops=rep.decode.total,
                saved_pct=_pct(rep.total, base.total),
                paper_flops=paper,
                paper_saved_pct=_pct(paper, base_paper),
                kv_bytes=kv,
                kv_saved_pct=_pct(kv, base_kv),
            )
        )
    return rows


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


def _square_grid(arch: Architecture, tokens: int) -> tuple[int, int, int]:
    """A Qwen ``(1, h, w)`` patch grid of one image giving ``tokens`` decoder tokens, as square as possible."""
    rows = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    m = arch.vision.spatial_merge
    return (1, rows * m, tokens // rows * m)


def _video_sample(arch: Architecture, frames: int) -> tuple[int, dict, VisionWorkload, str]:
    """:func:`_plan_sample` for one video of ``frames`` frames through a fixed-resolution family."""
    frames = check_count(frames, "video_frames")
    per = None if arch.is_qwen else arch.tokens.video_decoder_tokens
    if per is None:
        raise ValueError(
            f"{arch.display}: video_frames={frames} needs a fixed-resolution video family (Video-LLaVA, "
            "LLaVA-NeXT-Video, LLaVA-OneVision); for Qwen give vision_tokens"
        )
    work = VisionWorkload(video_frames=frames, videos=1)
    tokens = frames * per + arch.tokens.video_extra_tokens
    return tokens, _encoder_kwargs(arch, work), work, f"one video of {frames} frames, {per} tokens per frame"


def _plan_sample(config, vision_tokens: int | None, image_size, video_frames: int = 0):
    """Decoder vision tokens, count_flops encoder kwargs, the workload and a note on how it was chosen; with
    ``video_frames``, one video of that many frames (and no image)."""
    arch = architecture(config)
    if video_frames:
        return _video_sample(arch, video_frames)
    layout = image_layout(config, image_size or DEFAULT_IMAGE_SIZE)
    h, w = layout.image_size
    if vision_tokens is None:
        work = layout.workload
        note = f"one {w}x{h} (WxH) image: {layout.note}"
        encoder = _encoder_kwargs(arch, work)
        if arch.anyres:  # the image's grids, for the methods acting on them
            encoder["vision_layout"] = SampleLayout(images=image_grids(config, (h, w)))
        return layout.vision_tokens, encoder, work, note
    vision_tokens = check_count(vision_tokens, "vision_tokens")
    if vision_tokens == 0:
        return 0, _encoder_kwargs(arch, VisionWorkload()), VisionWorkload(), "no image (text only)"
    if arch.is_qwen:
        grid = _square_grid(arch, vision_tokens)
        px = arch.vision.patch
        work = VisionWorkload(grids=(grid,))
        note = (
            f"one image of {grid[2] * px}x{grid[1] * px} px ({grid[1]}x{grid[2]} patches) giving {vision_tokens} tokens"
        )
        return vision_tokens, _encoder_kwargs(arch, work), work, note
    if arch.anyres:
        work = layout.workload
        note = f"{vision_tokens} decoder tokens (given); encoder work of one {w}x{h} image: {layout.note}"
        return vision_tokens, _encoder_kwargs(arch, work), work, note
    per = arch.tokens.image_decoder_tokens
    if vision_tokens % per:
        raise ValueError(f"{arch.display}: vision_tokens={vision_tokens} is not a whole number of {per}-token images")
    work = VisionWorkload(image_inputs=vision_tokens // per)
    return vision_tokens, _encoder_kwargs(arch, work), work, f"{work.image_inputs} image(s) of {per} tokens"


def _encoder_kwargs(arch: Architecture, work: VisionWorkload) -> dict:
    if arch.is_qwen:
        return {"vision_grids": work.grids}
    return {"vision_inputs": work.image_inputs, "video_frames": work.video_frames}


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
    v, encoder, work, note = _plan_sample(config, vision_tokens, image_size, video_frames)
    methods = None
    if method is not None and method.name != "vtw":
        methods = [Withdrawal(), *method_settings(method, arch.decoder.num_layers)]
    rows = flops_table(
        config,
        vision_tokens=v,
        text_tokens=text_tokens,
        generated_tokens=generated_tokens,
        layers=layers,
        dtype=dtype,
        methods=methods,
        **encoder,
    )
    if methods is not None:  # the method's settings: drop those that cost what an earlier row costs (e.g. a pool
        # window wider than the grid, a VisionZip count above the tower's patches); vanilla and the given one stay
        seen = {rows[0].flops, rows[1].flops}
        kept = rows[:2]
        for r in rows[2:]:
            if r.flops not in seen:
                seen.add(r.flops)
                kept.append(r)
        rows = kept
    name = str(model_config_path_or_name) if not hasattr(model_config_path_or_name, "to_dict") else arch.display
    hub = SHIPPED_CHECKPOINTS.get(name)
    result = PlanResult(
        model=name,
        family=arch.display,
        vision_tokens=v,
        text_tokens=text_tokens,
        generated_tokens=generated_tokens,
        workload=work,
        encoder_note=note,
        rows=rows,
    )
    print_plan(result, arch=arch, hub_id=hub, dtype=str(dtype), console=console)
    return result


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
