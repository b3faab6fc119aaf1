"""Rich rendering of the FLOPs planning table (:func:`vtw.flops.plan_flops`)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .flops.arch import Architecture
from .flops.paper import PAPER_CONVENTION
from .flops.plan import EXACT_CONVENTION, FlopsRow, PlanResult

_MIB = 2**20


def render_flops_table(rows: Sequence[FlopsRow], *, title: str | None = None) -> Table:
    """A rich Table with one line per withdrawal layer: exact TFLOPs (total, prefill, decode) and % saved, the
    papers' TFLOPs and % saved, and the KV cache (MiB, % saved). The vanilla row (``K = L``) is labelled."""
    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("K", justify="right")
    table.add_column("TFLOPs\n(exact)", justify="right")
    table.add_column("prefill", justify="right")
    table.add_column("decode", justify="right")
    table.add_column("saved", justify="right")
    table.add_column("TFLOPs\n(paper)", justify="right")
    table.add_column("saved\n(paper)", justify="right")
    table.add_column("KV MiB", justify="right")
    table.add_column("KV saved", justify="right")
    for r in rows:
        label = f"{r.layer} (vanilla)" if r.vanilla else str(r.layer)
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


def print_plan(
    result: PlanResult, *, arch: Architecture, hub_id: str | None, dtype: str, console: Console | None = None
) -> None:
    """Print the header (model, sample), the table and the conventions of :func:`vtw.flops.plan_flops`."""
    console = console or Console()
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
    console.print(render_flops_table(result.rows, title="FLOPs per sample by withdrawal layer K"))
    console.print(f"[dim]{EXACT_CONVENTION}.[/dim]")
    console.print(f"[dim]paper: {PAPER_CONVENTION}; layers >= K see the text tokens only.[/dim]")
