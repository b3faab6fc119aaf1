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
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text, read_json, read_jsonl
from .loyalty import FIELDS as LOYALTY_FIELDS
from .loyalty import loyalty
from .results import CSV, MD, SAMPLES_FILE, TABLE, RunResult, cell, columns, row_label, row_ok
from .status import find_job_dirs as _find_job_dirs
from .status import read_job_dir

MAX_DEPTH = 4


@dataclass
class SweepSummary:
    """All rows of a sweep, the counts per status, and the files written (``paths``: csv, md, pareto).

    A row is a plain dict: :meth:`RunResult.row` of each evaluated variant (its ``<task>/<metric>`` values
    included), or what ``job.json`` says of a failed or unfinished job; plus ``job``, ``job_dir``, ``job_num``,
    ``status`` and ``label``. :data:`~vtw.pipeline.results.COLUMNS` says which fields show where.
    """

    sweep_dir: Path
    rows: list[dict]
    paths: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why loyalty could not be computed

    def _jobs(self) -> dict[str, str]:
        return {r["job"]: r["status"] for r in self.rows}

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
    def failed_jobs(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def metric_columns(self) -> list[str]:
        """Every ``<task>/<metric>`` of the rows (the only keys with a ``/``), sorted."""
        return sorted({k for r in self.rows for k in r if "/" in k})

    def points(self) -> list[dict]:
        """Rows that go on the Pareto plot: finished, with accuracy and TFLOPs; one per (model, dataset, setting),
        the setting being the method's label (``fastv K=2 keep=0.5``), or none for the baseline."""
        seen, out = set(), []
        for r in self.rows:
            if not row_ok(r) or r.get("accuracy") is None or not r.get("tflops"):
                continue
            setting = None if r["layer"] is None else (r.get("method_label") or (r["method"], r["layer"]))
            key = (r["model"], r["dataset"], setting)
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


def rows_for_job(job_dir: Path, root: Path) -> list[dict]:
    """The rows of one job directory (its state from :func:`vtw.pipeline.status.read_job_dir`)."""
    name = str(job_dir.relative_to(root)) if job_dir != root else job_dir.name
    jd = read_job_dir(job_dir)
    job, status = jd.job, jd.state
    base = {"job": name, "job_dir": str(job_dir), "job_num": job.get("job_num")}
    if jd.done and jd.results is not None:
        result = RunResult.from_dict(jd.results)
        return [{**row, **base, "status": status} for row in result.rows()]
    layer = job.get("layer")
    return [
        {
            **base,
            "status": status,
            "model": job.get("model"),
            "dataset": job.get("dataset"),
            "layer": layer if isinstance(layer, int) and not isinstance(layer, bool) else None,
            "error": (job.get("error") or None) if status == "failed" else None,
            **(_choice_fields(job_dir) if status == "ok" else {}),
        }
    ]


def _choice_fields(job_dir: Path) -> dict:
    """A ``mode=choose`` job (no ``results.json``): the chosen method, its setting and the budget from its
    ``choose.json``; ``{}`` for any other job."""
    try:
        choice = read_json(job_dir / "choose.json")["choice"]
        chosen = next(s for s in choice["scores"] if s["name"] == choice["chosen"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return {}
    return {
        "method": chosen["name"],
        "method_label": f"auto: {chosen['label']}",
        "budget": choice["budget"],
        "budget_ratio": chosen["budget_ratio"],
    }


# ------------------------------------------------------------------------------------------------ writing
def to_csv(summary: SweepSummary) -> str:
    shown, metrics = columns(CSV), summary.metric_columns
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.name for c in shown] + metrics)
    for r in summary.rows:
        w.writerow([c.text(CSV, r) for c in shown] + [cell(r, m) for m in metrics])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(summary: SweepSummary) -> str:
    shown = columns(MD)
    lines = [
        f"# Sweep summary: {summary.sweep_dir.name}",
        "",
        f"{summary.jobs} jobs: {summary.ok} ok, {summary.failed} failed, {summary.count('running')} running/unfinished.",
        "",
        "| " + " | ".join(c.name for c in shown) + " |",
        "|" + "|".join("---" for _ in shown) + "|",
    ]
    for r in summary.rows:
        lines.append("| " + " | ".join(_md_escape(c.text(MD, r)) for c in shown) + " |")
    if summary.failed_jobs:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- `{r['job']}`: {_md_escape(r.get('error') or 'unknown error')}" for r in summary.failed_jobs]
    primary = {r["primary_metric"] for r in summary.rows if r.get("primary_metric")}
    lines += ["", f"accuracy = {', '.join(sorted(primary)) or 'n/a'}; TFLOPs per sample (exact matmul count, prefill +"]
    lines += ["decode); saved = vs K = L on the same samples; loyalty = share of samples answered as the full model",
              "(the sweep's baseline job, or the job's own baseline). Plot: pareto.png.", ""]  # fmt: skip
    lines += [f"Note: {note}" for note in summary.notes] + ([""] if summary.notes else [])
    return "\n".join(lines)


def rich_table(summary: SweepSummary):
    from rich.table import Table

    t = Table(
        title=f"sweep {summary.sweep_dir}: {summary.ok}/{summary.jobs} ok, {summary.failed} failed",
        title_justify="left",
    )
    shown = columns(TABLE)
    for c in shown:
        t.add_column(c.header or c.name, justify=c.justify)
    for r in summary.rows:
        t.add_row(*[c.text(TABLE, r) for c in shown])
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
    rows: list[dict] = []
    for d in find_job_dirs(root):
        rows.extend(rows_for_job(d, root))
    summary = SweepSummary(sweep_dir=root, rows=[{**r, "label": row_label(r)} for r in rows])
    summary.notes += add_loyalty(summary.rows)
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
            console.print(f"[red]failed[/red] {r['job']}: {r['error']}")
        for note in summary.notes:
            console.print(f"[yellow]note[/yellow] {note}")
        if summary.paths:
            console.print("wrote " + ", ".join(str(p) for p in summary.paths.values()))
    return summary


def _samples(job_dir: str, variant: str) -> list[dict]:
    try:
        return [s for s in read_jsonl(Path(job_dir) / SAMPLES_FILE) if s.get("variant") == variant]
    except (OSError, ValueError):
        return []


def _evaluated(row: dict) -> bool:
    """Whether a row is a variant of a ``results.json`` (a ``mode=choose`` or ``mode=flops`` job scored no samples,
    so it has no loyalty to fill)."""
    return "variant" in row


def add_loyalty(rows: list[dict]) -> list[str]:
    """Fill each finished row's loyalty (:mod:`vtw.pipeline.loyalty`) against the sweep's baseline job of the same
    model and dataset (a job whose variant is ``baseline``), from both jobs' ``samples.jsonl``; rows that carry it
    already (their job evaluated its own baseline) keep theirs. Returns notes for the rows it could not fill (no
    baseline in the sweep: it says so instead of inventing one)."""
    missing = {(r["model"], r["dataset"]) for r in rows if row_ok(r) and r.get("loyalty") is None and _evaluated(r)}
    notes, reference = [], {}
    for model, dataset in sorted(missing, key=str):
        base = next((r for r in rows if row_ok(r) and r.get("variant") == "baseline" and r.get("model") == model
                     and r.get("dataset") == dataset), None)  # fmt: skip
        if base is None:
            notes.append(
                f"no baseline job (vtw.layer=null) of {model} / {dataset} in this sweep: its loyalty is not computed"
            )
        else:
            reference[(model, dataset)] = _samples(base["job_dir"], "baseline")
    for r in rows:
        ref = reference.get((r.get("model"), r.get("dataset")))
        if ref and row_ok(r) and r.get("loyalty") is None:
            found = loyalty(_samples(r["job_dir"], r["variant"]), ref)
            r.update({k: found[k] for k in LOYALTY_FIELDS if found[k] is not None})
    return notes
