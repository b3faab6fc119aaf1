"""What a job produces: typed results, their flat summary, and the files they live in.

Each job directory holds (all written atomically):

* ``results.json``: :class:`RunResult` (``schema: vtw.results/1``): every task metric, the cost figures of the
  configured layer (and of the baseline ``K = L`` when ``compare_baseline`` evaluated it), the resolved config and
  its hash, git commit, package versions, whether they are the locked set (``lock``: ``requirements.lock``'s
  sha256 and any package that differs from it), and ``summary``: the flat metrics also logged to W&B.
* ``samples.jsonl``: one line per sample and evaluated variant (response, target, per-sample scores, tokens,
  FLOPs, latency).
* ``job.json``: :mod:`vtw.pipeline.status`.
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
        label: ``"vtw"`` (the configured layer) or ``"baseline"`` (no withdrawal).
        layer: ``K`` (``None``: no withdrawal); method: ``vtw`` | ``random``.
        metrics: ``{"<task>/<metric>": value}`` for every numeric metric lmms-eval reported.
        accuracy: the value of the dataset's primary metric (``None`` if lmms-eval did not report it).
        num_samples: samples evaluated (over all tasks).
        tflops / tflops_full: mean TFLOPs per sample at ``layer`` / at ``K = L`` (counted convention).
        tflops_saved_pct: ``100 * (1 - sum(flops) / sum(flops_full))`` over the samples.
        paper_tflops / paper_tflops_full / paper_tflops_saved_pct: the same in the FastV/VTW paper convention.
        latency_s: mean model-call seconds per sample (batch time shared by its samples; input processing excluded).
        samples_per_s: samples / total model-call seconds.
        generated_tokens / vision_tokens / text_tokens: per-sample means.
        peak_mem_gb: peak memory (GiB): CUDA max allocated during this variant, or the process's peak RSS on CPU.
        peak_mem_kind: ``"cuda_max_allocated"`` or ``"cpu_max_rss"``.
        wall_s: wall time of the whole evaluation of this variant (lmms-eval included).
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

    SUMMARY_KEYS = (
        "accuracy",
        "tflops",
        "tflops_full",
        "tflops_saved_pct",
        "paper_tflops",
        "paper_tflops_saved_pct",
        "latency_s",
        "samples_per_s",
        "generated_tokens",
        "peak_mem_gb",
        "num_samples",
    )

    def summary(self, prefix: str = "") -> dict[str, float | int | None]:
        """Flat metrics: every ``<task>/<metric>`` plus :attr:`SUMMARY_KEYS`, keys prefixed with ``prefix``."""
        out: dict = {f"{prefix}{k}": v for k, v in self.metrics.items()}
        out.update({f"{prefix}{k}": getattr(self, k) for k in self.SUMMARY_KEYS})
        out[f"{prefix}layer"] = self.layer
        return out

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
    schema: str = SCHEMA
    status: str = "ok"

    @property
    def layer(self) -> int | None:
        return self.result.layer

    def summary(self) -> dict:
        """The flat metrics logged as the W&B run summary (baseline figures under ``baseline/``)."""
        out = self.result.summary()
        if self.baseline is not None:
            out.update(self.baseline.summary("baseline/"))
        return out

    def variants(self) -> list[VariantResult]:
        return [v for v in (self.baseline, self.result) if v is not None]

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
