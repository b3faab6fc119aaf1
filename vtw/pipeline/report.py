"""The one-screen summary printed at the end of a run (rich): one column per evaluated variant, so it fits a
narrow terminal or a SLURM log."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from .results import RunResult, VariantResult


def make_console() -> Console:
    """A console for summaries: the terminal's width on a TTY, 160 columns in a log file (rich's 80 truncates)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


ROWS = (
    ("TFLOPs / sample", lambda v: _num(v.tflops)),
    ("saved vs K=L", lambda v: f"{v.tflops_saved_pct:.1f}%"),
    ("paper TFLOPs / sample", lambda v: _num(v.paper_tflops)),
    ("paper saved vs K=L", lambda v: f"{v.paper_tflops_saved_pct:.1f}%"),
    ("latency s / sample", lambda v: _num(v.latency_s)),
    ("samples / s (model)", lambda v: _num(v.samples_per_s, 3)),
    ("generated tokens", lambda v: _num(v.generated_tokens, 3)),
    ("vision + text tokens", lambda v: f"{v.vision_tokens:.0f} + {v.text_tokens:.0f}"),
    ("peak memory GiB", lambda v: f"{v.peak_mem_gb:.2f}"),
    ("samples", lambda v: str(v.num_samples)),
)


def _head(v: VariantResult, num_layers: int) -> str:
    return f"{v.label} (K={'L' if v.layer is None else v.layer}{'' if v.layer is not None else f'={num_layers}'})"


def run_table(result: RunResult) -> Table:
    """Metrics (rows) of each evaluated variant (columns) of a job; the primary metric first."""
    variants = result.variants()
    t = Table(title=f"{result.name}: {result.model} on {result.dataset}", title_justify="left")
    t.add_column("", justify="left")
    for v in variants:
        t.add_column(_head(v, result.num_layers), justify="right")
    names = [result.primary_metric] + sorted(k for k in result.result.metrics if k != result.primary_metric)
    for i, name in enumerate(names):
        label = f"[bold]{name}[/bold]" if i == 0 else name
        t.add_row(label, *[_num(v.metrics.get(name)) for v in variants])
    t.add_section()
    for label, fn in ROWS:
        t.add_row(label, *[fn(v) for v in variants])
    return t


def print_run_summary(
    result: RunResult, out_dir, wandb_info: dict | None = None, console: Console | None = None
) -> None:
    """Print the run table, where its files are, and how W&B logging went."""
    console = console or make_console()
    console.print(run_table(result))
    console.print(f"results: {out_dir}/results.json  samples: {out_dir}/samples.jsonl")
    if wandb_info and wandb_info.get("status") == "logged":
        line = f"W&B ({wandb_info.get('mode')}): run {wandb_info.get('run_id')}, group {wandb_info.get('group')}"
        if wandb_info.get("sync"):
            line += f"; upload with: {wandb_info['sync']}"
        console.print(line, soft_wrap=True)
    elif wandb_info and wandb_info.get("status") == "failed":
        console.print(f"[yellow]W&B logging failed ({wandb_info.get('error')}); local results are complete[/yellow]")
