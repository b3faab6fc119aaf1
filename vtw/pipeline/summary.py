"""Summaries of a directory of jobs (a Hydra sweep, a SLURM array, or any folder of job directories).

:func:`summarize_sweep` finds every job directory under ``sweep_dir`` (a directory with ``job.json`` or
``results.json``), reads it, and writes ``summary.csv``, ``summary.md`` and ``pareto.png`` into ``sweep_dir``, then
prints a rich table. A failed job is a row with ``status=failed`` and its error; the others are summarised as usual.
One row per evaluated variant: a job that also evaluated the baseline (``compare_baseline``) gives two rows.

Also a command: ``python -m vtw.pipeline.summarize SWEEP_DIR``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text
from .results import RunResult, VariantResult
from .status import find_job_dirs as _find_job_dirs
from .status import read_job_dir

MAX_DEPTH = 4

COLUMNS = (
    "job",
    "status",
    "variant",
    "model",
    "dataset",
    "method",
    "layer",
    "num_layers",
    "primary_metric",
    *VariantResult.SUMMARY_KEYS,  # the same figures as each job's results.json summary
    "error",
    "job_dir",
)


@dataclass(frozen=True)
class SummaryRow:
    """One evaluated variant of one job (or one failed / unfinished job)."""

    job: str
    job_dir: str
    status: str
    variant: str | None = None
    model: str | None = None
    dataset: str | None = None
    method: str | None = None
    layer: int | None = None
    num_layers: int | None = None
    primary_metric: str | None = None
    accuracy: float | None = None
    tflops: float | None = None
    tflops_full: float | None = None
    tflops_saved_pct: float | None = None
    paper_tflops: float | None = None
    paper_tflops_saved_pct: float | None = None
    latency_s: float | None = None
    samples_per_s: float | None = None
    generated_tokens: float | None = None
    peak_mem_gb: float | None = None
    num_samples: int | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    job_num: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    @property
    def label(self) -> str:
        k = "L" if self.layer is None else str(self.layer)
        return f"{self.model}/{self.dataset} K={k}"

    def as_dict(self) -> dict:
        d = {c: getattr(self, c) for c in COLUMNS}
        d.update(self.metrics)
        return d


@dataclass
class SweepSummary:
    """All rows of a sweep, the counts per status, and the files written (``paths``: csv, md, pareto)."""

    sweep_dir: Path
    rows: list[SummaryRow]
    paths: dict = field(default_factory=dict)

    TABLE_COLUMNS = ("job", "status", "variant", "model", "dataset", "layer", "accuracy", "tflops", "tflops_saved_pct")
    TABLE_COLUMNS += ("paper_tflops", "latency_s", "peak_mem_gb", "label", "error")

    def _jobs(self) -> dict[str, str]:
        return {r.job: r.status for r in self.rows}

    @property
    def jobs(self) -> int:
        return len(self._jobs())

    def count(self, status: str) -> int:
        return sum(1 for s in self._jobs().values() if s == status)

    @property
    def ok(self) -> int:
        return self.count("ok") + self.count("skipped")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def failed_jobs(self) -> list[SummaryRow]:
        return [r for r in self.rows if r.status == "failed"]

    @property
    def metric_columns(self) -> list[str]:
        return sorted({k for r in self.rows for k in r.metrics})

    def table_rows(self) -> list[dict]:
        return [{**r.as_dict(), "label": r.label} for r in self.rows]

    def points(self) -> list[SummaryRow]:
        """Rows that go on the Pareto plot: finished, with accuracy and TFLOPs; one per (model, dataset, method, K)."""
        seen, out = set(), []
        for r in self.rows:
            if not r.ok or r.accuracy is None or not r.tflops:
                continue
            key = (r.model, r.dataset, r.method if r.layer is not None else None, r.layer)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out


# ------------------------------------------------------------------------------------------------ reading
def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job directories under ``sweep_dir`` (itself included, at most :data:`MAX_DEPTH` below), in natural order."""
    root = Path(sweep_dir)
    found = _find_job_dirs(root, max_depth=MAX_DEPTH)
    return sorted(found, key=lambda p: _natural(str(p.relative_to(root))))


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def rows_for_job(job_dir: Path, root: Path) -> list[SummaryRow]:
    """The rows of one job directory."""
    name = str(job_dir.relative_to(root)) if job_dir != root else job_dir.name
    jd = read_job_dir(job_dir)
    job, status = jd.job, jd.state
    base = {"job": name, "job_dir": str(job_dir), "job_num": job.get("job_num")}
    if jd.done and jd.results is not None:
        result = RunResult.from_dict(jd.results)
        return [
            SummaryRow(
                **base,
                status=status,
                variant=v.label,
                model=result.model,
                dataset=result.dataset,
                method=v.method,
                layer=v.layer,
                num_layers=result.num_layers,
                primary_metric=result.primary_metric,
                accuracy=v.accuracy,
                tflops=v.tflops,
                tflops_full=v.tflops_full,
                tflops_saved_pct=v.tflops_saved_pct,
                paper_tflops=v.paper_tflops,
                paper_tflops_saved_pct=v.paper_tflops_saved_pct,
                latency_s=v.latency_s,
                samples_per_s=v.samples_per_s,
                generated_tokens=v.generated_tokens,
                peak_mem_gb=v.peak_mem_gb,
                num_samples=v.num_samples,
                metrics=dict(v.metrics),
            )
            for v in result.variants()
        ]
    layer = job.get("layer")
    return [
        SummaryRow(
            **base,
            status=status,
            model=job.get("model"),
            dataset=job.get("dataset"),
            layer=layer if isinstance(layer, int) and not isinstance(layer, bool) else None,
            error=(job.get("error") or None) if status == "failed" else None,
        )
    ]


# ------------------------------------------------------------------------------------------------ writing
def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def to_csv(summary: SweepSummary) -> str:
    cols = list(COLUMNS) + summary.metric_columns
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in summary.rows:
        d = r.as_dict()
        w.writerow([_cell(d.get(c)) for c in cols])
    return buf.getvalue()


_MD_COLS = ("job", "status", "variant", "model", "dataset", "layer", "accuracy", "tflops", "tflops_saved_pct")
_MD_COLS += ("paper_tflops", "latency_s", "peak_mem_gb")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(summary: SweepSummary) -> str:
    lines = [
        f"# Sweep summary: {summary.sweep_dir.name}",
        "",
        f"{summary.jobs} jobs: {summary.ok} ok, {summary.failed} failed, {summary.count('running')} running/unfinished.",
        "",
        "| " + " | ".join(_MD_COLS) + " |",
        "|" + "|".join("---" for _ in _MD_COLS) + "|",
    ]
    for r in summary.rows:
        d = r.as_dict()
        d["layer"] = "L (none)" if r.layer is None and r.ok else d["layer"]
        lines.append("| " + " | ".join(_md_escape(_cell(d.get(c))) for c in _MD_COLS) + " |")
    if summary.failed_jobs:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- `{r.job}`: {_md_escape(r.error or 'unknown error')}" for r in summary.failed_jobs]
    primary = {r.primary_metric for r in summary.rows if r.primary_metric}
    lines += ["", f"accuracy = {', '.join(sorted(primary)) or 'n/a'}; TFLOPs per sample (exact matmul count, prefill +"]
    lines += ["decode); saved = vs K = L on the same samples. Plot: pareto.png.", ""]
    return "\n".join(lines)


def rich_table(summary: SweepSummary):
    from rich.table import Table

    t = Table(
        title=f"sweep {summary.sweep_dir}: {summary.ok}/{summary.jobs} ok, {summary.failed} failed",
        title_justify="left",
    )
    for c in (
        "job",
        "status",
        "variant",
        "model",
        "dataset",
        "K",
        "accuracy",
        "TFLOPs",
        "saved",
        "latency s",
        "peak GiB",
    ):
        t.add_column(c, justify="left" if c in ("job", "status", "variant", "model", "dataset") else "right")
    style = {"ok": "green", "skipped": "cyan", "failed": "red", "running": "yellow"}
    for r in summary.rows:
        t.add_row(
            r.job,
            f"[{style.get(r.status, 'white')}]{r.status}[/]",
            r.variant or "",
            r.model or "",
            r.dataset or "",
            "L" if r.layer is None and r.ok else _cell(r.layer),
            _cell(r.accuracy),
            _cell(r.tflops),
            "" if r.tflops_saved_pct is None else f"{r.tflops_saved_pct:.1f}%",
            _cell(r.latency_s),
            "" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.2f}",
        )
    return t


def summarize_sweep(sweep_dir: str | Path, *, write: bool = True, plot: bool = True, console=None) -> SweepSummary:
    """Summarise every job under ``sweep_dir``.

    Args:
        write: write ``summary.csv`` and ``summary.md`` (atomically) into ``sweep_dir``.
        plot: write ``pareto.png`` (needs at least one finished job with an accuracy).
        console: a ``rich.console.Console`` to print the table on; ``False``: print nothing; ``None``: stdout.

    Raises:
        ValueError: ``sweep_dir`` is not a directory.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep directory {str(sweep_dir)!r} does not exist")
    rows: list[SummaryRow] = []
    for d in find_job_dirs(root):
        rows.extend(rows_for_job(d, root))
    summary = SweepSummary(sweep_dir=root, rows=rows)
    if write:
        summary.paths["csv"] = atomic_write_text(root / "summary.csv", to_csv(summary))
        summary.paths["md"] = atomic_write_text(root / "summary.md", to_markdown(summary))
    if plot and summary.points():
        from .pareto import plot_pareto

        summary.paths["pareto"] = plot_pareto(summary.points(), root / "pareto.png")
    if console is not False:
        from .report import make_console

        console = console or make_console()
        console.print(rich_table(summary))
        for r in summary.failed_jobs:
            console.print(f"[red]failed[/red] {r.job}: {r.error}")
        if summary.paths:
            console.print("wrote " + ", ".join(str(p) for p in summary.paths.values()))
    return summary
