"""The one-screen summary printed at the end of a run (rich): one column per evaluated variant, so it fits a
narrow terminal or a SLURM log."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from .results import JOB, RunResult, columns, num


def make_console() -> Console:
    """A console for summaries: the terminal's width on a TTY, 160 columns in a log file (rich's 80 truncates)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _head(row: dict, num_layers: int) -> str:
    layer = row["layer"]
    if layer is not None and row.get("method_label") and row.get("method") != "vtw":
        return row["method_label"]  # e.g. fastv K=2 keep=0.5
    return f"{row['variant']} (K={'L' if layer is None else layer}{'' if layer is not None else f'={num_layers}'})"


def run_table(result: RunResult) -> Table:
    """Metrics (rows) of each evaluated variant (columns) of a job, the primary metric first; then the
    :data:`~vtw.pipeline.results.COLUMNS` shown in the job table."""
    rows = result.rows()
    t = Table(title=f"{result.name}: {result.model} on {result.dataset}", title_justify="left")
    t.add_column("", justify="left")
    for r in rows:
        t.add_column(_head(r, result.num_layers), justify="right")
    names = [result.primary_metric] + sorted(k for k in result.result.metrics if k != result.primary_metric)
    for i, name in enumerate(names):
        label = f"[bold]{name}[/bold]" if i == 0 else name
        t.add_row(label, *[num(r, name) for r in rows])
    t.add_section()
    for c in columns(JOB):
        t.add_row(c.label or c.name, *[c.text(JOB, r) for r in rows])
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
