"""What a job produces: typed results, their flat summary, and the files they live in.

Each job directory holds (all written atomically):

* ``results.json``: :class:`RunResult` (``schema: vtw.results/1``): every task metric, the cost figures of the
  configured layer (and of the baseline ``K = L`` when ``compare_baseline`` evaluated it), the resolved config and
  its hash, git commit, package versions, whether they are the locked set (``lock``: ``requirements.lock``'s
  sha256 and any package that differs from it), and ``summary``: the flat metrics also logged to W&B.
* ``samples.jsonl``: one line per sample and evaluated variant (response, target, per-sample scores, tokens,
  FLOPs, latency).
* ``job.json``: :mod:`vtw.pipeline.status`.

The one result schema: :meth:`RunResult.rows` gives one plain dict per evaluated variant, and :data:`COLUMNS` says
how each field shows in every output (``summary.csv``, ``summary.md``, the terminal tables at job and sweep end, the
W&B run summary and sweep table). A new column is one :class:`Column` there (plus its field in :class:`VariantResult`
or :class:`RunResult`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..io import atomic_write_json, atomic_write_jsonl, read_json

SCHEMA = "vtw.results/1"
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class VariantResult:
    """One evaluated withdrawal setting (the configured layer, or the baseline ``K = L``).

    Attributes:
        label: the method's name (``"vtw"``, ``"fastv"``, ...: the configured reduction) or ``"baseline"`` (none).
        layer: ``K``, the method's first stage (``None``: no reduction); method: its name (``vtw.method``);
        method_label: e.g. ``fastv K=2 keep=0.5``; params: the method's parameters as evaluated.
        budget / budget_ratio: with ``vtw.budget``, the share of the full model's TFLOPs asked, and the share the
            chosen setting reached on the prompts it was matched on (``None`` otherwise).
        loyalty / first_token_agreement / first_token_kl: agreement with the full model on the same samples
            (:mod:`vtw.pipeline.loyalty`), when the job (or the sweep's summary) had the full model's answers.
        metrics: ``{"<task>/<metric>": value}`` for every numeric metric lmms-eval reported.
        accuracy: the value of the dataset's primary metric (``None`` if lmms-eval did not report it).
        num_samples: samples evaluated (over all tasks).
        tflops / tflops_full: mean TFLOPs per sample at ``layer`` / at ``K = L`` (counted convention).
        tflops_saved_pct: ``100 * (1 - sum(flops) / sum(flops_full))`` over the samples.
        tflops_expected: mean TFLOPs per sample from the method's declared counts (``tflops`` counts what each layer
            really processed: the two differ for methods whose counts depend on the data).
        paper_tflops / paper_tflops_full / paper_tflops_saved_pct: the same in the FastV/VTW paper convention.
        latency_s: mean model-call seconds per sample (batch time shared by its samples; input processing excluded).
        samples_per_s: samples / model-call seconds (data parallel: of the busiest rank, the replicas running side
            by side).
        generated_tokens / vision_tokens / text_tokens: per-sample means.
        peak_mem_gb: peak memory (GiB): CUDA max allocated during this variant, or the process's peak RSS on CPU.
        peak_mem_kind: ``"cuda_max_allocated"`` or ``"cpu_max_rss"``.
        wall_s: wall time of the whole evaluation of this variant (lmms-eval included; data parallel: the slowest rank).
        processes: data-parallel processes (ranks) that evaluated it, one model replica each.
    """

    label: str
    layer: int | None
    method: str
    metrics: dict[str, float]
    accuracy: float | None
    num_samples: int
    tflops: float
    tflops_full: float
    tflops_saved_pct: float
    paper_tflops: float
    paper_tflops_full: float
    paper_tflops_saved_pct: float
    latency_s: float
    samples_per_s: float
    generated_tokens: float
    vision_tokens: float
    text_tokens: float
    peak_mem_gb: float
    peak_mem_kind: str
    wall_s: float
    method_label: str = ""
    params: dict = field(default_factory=dict)
    budget: float | None = None
    budget_ratio: float | None = None
    loyalty: float | None = None  # vtw.pipeline.loyalty: share of samples answered as the full model does
    first_token_agreement: float | None = None  # generation: first token's top-1 equal to the full model's
    first_token_kl: float | None = None  # generation: mean KL(P_full || P) of the first token (nats; lone runs)
    processes: int = 1  # data-parallel ranks
    tflops_expected: float | None = None

    def row(self) -> dict:
        """This variant's scalar fields as a dict (``label`` under ``variant``), then its ``<task>/<metric>`` values."""
        row = {("variant" if f.name == "label" else f.name): getattr(self, f.name) for f in fields(self)}
        del row["metrics"], row["params"]
        row.update(self.metrics)
        return row

    @classmethod
    def from_dict(cls, d: dict) -> VariantResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class RunResult:
    """Everything ``results.json`` holds for one job (``status == "ok"``)."""

    name: str
    model: str
    pretrained: str
    family: str
    num_layers: int
    dataset: str
    tasks: list[str]
    limit: int | float | None
    layer_requested: int | str | None
    primary_metric: str
    result: VariantResult
    baseline: VariantResult | None
    config: dict
    config_hash: str
    git: dict
    packages: dict
    job: dict
    conventions: dict = field(default_factory=dict)
    lock: dict = field(default_factory=dict)  # envinfo.lock_status(): the lock's sha256 and whether it is installed
    budget: dict | None = None  # vtw.budget: vtw.flops.budget.BudgetMatch.to_dict() (asked, chosen, reached)
    choice: dict | None = None  # vtw.method=auto: what choose.json holds (the table, the chosen method, the cost)
    schema: str = SCHEMA
    status: str = "ok"

    @property
    def layer(self) -> int | None:
        return self.result.layer

    def summary(self) -> dict:
        """The flat metrics logged as the W&B run summary: every ``<task>/<metric>``, then the :data:`COLUMNS` shown
        in the ``summary``; the baseline's under ``baseline/``."""
        shown = sorted(columns(SUMMARY), key=lambda c: c.name == "layer")  # results.json lists the layer last
        out: dict = {}
        for prefix, v in (("", self.result), ("baseline/", self.baseline)):
            if v is not None:
                row = self.row(v)
                out.update({f"{prefix}{k}": value for k, value in v.metrics.items()})
                out.update({f"{prefix}{c.name}": row.get(c.name) for c in shown})
        return out

    def variants(self) -> list[VariantResult]:
        return [v for v in (self.baseline, self.result) if v is not None]

    def row(self, variant: VariantResult) -> dict:
        """One plain dict for ``variant``: this run's scalar fields (``model``, ``dataset``, ``num_layers``,
        ``primary_metric``, ...), then :meth:`VariantResult.row`. Every output draws from such rows through
        :data:`COLUMNS`."""
        skip = {"name", "status", "schema", "result", "baseline"}
        run = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        run = {k: v for k, v in run.items() if v is None or isinstance(v, (str, int, float))}
        return {**run, **variant.row()}

    def rows(self) -> list[dict]:
        """:meth:`row` of each evaluated variant, the baseline first."""
        return [self.row(v) for v in self.variants()]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["result"] = VariantResult.from_dict(d["result"])
        kw["baseline"] = VariantResult.from_dict(d["baseline"]) if d.get("baseline") else None
        return cls(**kw)


# ------------------------------------------------------------------------------------------------ the one schema
CSV, MD, TABLE, WANDB, SUMMARY, JOB = "csv", "md", "table", "wandb", "summary", "job"
"""The outputs a :class:`Column` can show in: ``summary.csv``, ``summary.md``, the terminal table at the end of a
sweep, the W&B sweep table, each job's W&B run summary (also ``results.json``'s ``summary``), and the terminal table
at the end of a job (one row per column there, one column per variant)."""


def cell(row: dict, name: str) -> str:
    """A value as text: ``""`` for ``None`` and NaN/inf, floats to 6 significant digits."""
    v = row.get(name)
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def num(row: dict, name: str, digits: int = 4) -> str:
    """A value as text for the job-end table: ``-`` for ``None``, ints as they are, floats to ``digits`` digits."""
    v = row.get(name)
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def _fixed(template: str):
    return lambda row, name: "" if row.get(name) is None else template.format(row[name])


def row_ok(row: dict) -> bool:
    """Whether a row's job finished (``ok``, or ``skipped`` because an identical job had)."""
    return row.get("status") in ("ok", "skipped")


def row_label(row: dict) -> str:
    """``<model>/<dataset> K=<layer | L>`` (VTW), or ``<model>/<dataset> <method label>`` (a peer): a row's point
    label (W&B scatter)."""
    head = f"{row.get('model')}/{row.get('dataset')}"
    if row.get("layer") is not None and row.get("method") not in (None, "vtw") and row.get("method_label"):
        return f"{head} {row['method_label']}"
    return f"{head} K={'L' if row.get('layer') is None else row['layer']}"


def _layer(none: str):
    return lambda row, name: none if row.get("layer") is None and row_ok(row) else cell(row, name)


_STYLE = {"ok": "green", "skipped": "cyan", "failed": "red", "running": "yellow"}


@dataclass(frozen=True)
class Column:
    """One field of the result rows (:meth:`RunResult.row`, :func:`vtw.pipeline.summary.rows_for_job`) and where
    it shows.

    Attributes:
        name: the row key; the header in CSV and Markdown, the key in W&B.
        where: the outputs that show it (:data:`CSV`, :data:`MD`, :data:`TABLE`, :data:`WANDB`, :data:`SUMMARY`,
            :data:`JOB`).
        header: its header in the sweep-end terminal table (default: ``name``).
        label: its row label in the job-end terminal table (default: ``name``).
        fmt: ``{output: f(row, name) -> str}`` where the text is not the default (:func:`cell` in CSV, Markdown and
            the sweep table, :func:`num` in the job table); W&B gets the raw value.
        justify: alignment in the sweep-end terminal table.
    """

    name: str
    where: frozenset[str]
    header: str = ""
    label: str = ""
    fmt: dict = field(default_factory=dict)
    justify: str = "right"

    def text(self, output: str, row: dict) -> str:
        return self.fmt.get(output, num if output == JOB else cell)(row, self.name)


def _col(name: str, *where: str, **kw) -> Column:
    return Column(name, frozenset(where), **kw)


_KEY = (CSV, MD, TABLE, WANDB)
COLUMNS: tuple[Column, ...] = (
    _col("job", *_KEY, justify="left"),
    _col("status", *_KEY, justify="left", fmt={TABLE: lambda r, n: f"[{_STYLE.get(r[n], 'white')}]{r[n]}[/]"}),
    _col("variant", *_KEY, justify="left"),
    _col("model", *_KEY, justify="left"),
    _col("dataset", *_KEY, justify="left"),
    _col("method", CSV),
    _col("method_label", *_KEY, header="method", justify="left"),
    _col("budget", CSV, MD, TABLE, WANDB, SUMMARY),
    _col("budget_ratio", CSV, WANDB, SUMMARY),
    _col("layer", *_KEY, SUMMARY, header="K", fmt={MD: _layer("L (none)"), TABLE: _layer("L")}),
    _col("num_layers", CSV),
    _col("primary_metric", CSV),
    _col("accuracy", *_KEY, SUMMARY),
    _col("loyalty", *_KEY, SUMMARY, JOB, label="loyalty (same answer as K=L)"),
    _col("first_token_agreement", CSV, WANDB, SUMMARY, JOB, label="first token top-1 = K=L"),
    _col("first_token_kl", CSV, MD, WANDB, SUMMARY, JOB, label="first token KL vs K=L"),
    _col("tflops", *_KEY, SUMMARY, JOB, header="TFLOPs", label="TFLOPs / sample"),
    _col("tflops_full", CSV, SUMMARY),
    _col("tflops_expected", CSV, MD, WANDB, SUMMARY, label="expected TFLOPs / sample"),
    _col("tflops_saved_pct", *_KEY, SUMMARY, JOB, header="saved", label="saved vs K=L",
         fmt=dict.fromkeys((TABLE, JOB), _fixed("{:.1f}%"))),
    _col("paper_tflops", CSV, MD, WANDB, SUMMARY, JOB, label="paper TFLOPs / sample"),
    _col("paper_tflops_saved_pct", CSV, SUMMARY, JOB, label="paper saved vs K=L", fmt={JOB: _fixed("{:.1f}%")}),
    _col("latency_s", *_KEY, SUMMARY, JOB, header="latency s", label="latency s / sample"),
    _col("samples_per_s", CSV, SUMMARY, JOB, label="samples / s (model)", fmt={JOB: lambda r, n: num(r, n, 3)}),
    _col("generated_tokens", CSV, SUMMARY, JOB, label="generated tokens", fmt={JOB: lambda r, n: num(r, n, 3)}),
    _col("vision_tokens", JOB, label="vision + text tokens",
         fmt={JOB: lambda r, n: f"{r['vision_tokens']:.0f} + {r['text_tokens']:.0f}"}),
    _col("peak_mem_gb", *_KEY, SUMMARY, JOB, header="peak GiB", label="peak memory GiB",
         fmt=dict.fromkeys((TABLE, JOB), _fixed("{:.2f}"))),
    _col("num_samples", CSV, SUMMARY, JOB, label="samples"),
    _col("label", WANDB),
    _col("error", CSV, WANDB),
    _col("job_dir", CSV),
)  # fmt: skip
"""Every result column, in the order every output lists them (the run summary lists ``layer`` last)."""


def columns(output: str) -> list[Column]:
    """The :data:`COLUMNS` shown in ``output``, in order."""
    return [c for c in COLUMNS if output in c.where]


def clean_number(x):
    """JSON-safe scalar: NaN/inf → ``None``; numpy scalars → Python."""
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def jsonable(x):
    """Deep copy of ``x`` that ``json.dumps(allow_nan=False)`` accepts (unknown objects become ``str``)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    x = clean_number(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def write_results(out_dir: str | Path, result: RunResult, samples: list[dict]) -> tuple[Path, Path]:
    """Write ``samples.jsonl`` then ``results.json`` (each atomically; results last, so its presence means done)."""
    out_dir = Path(out_dir)
    samples_path = atomic_write_jsonl(out_dir / SAMPLES_FILE, [jsonable(s) for s in samples])
    results_path = atomic_write_json(out_dir / RESULTS_FILE, jsonable(result.to_dict()))
    return results_path, samples_path


def read_results(path: str | Path) -> RunResult:
    """Read a ``results.json`` (or the one in a job directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    data = read_json(path)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a vtw results file (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    return RunResult.from_dict(data)
