"""lmms-eval glue: task index, the ``vtw`` model, one evaluation through ``simple_evaluate``, and its results.

Runs go through lmms-eval's ``simple_evaluate`` with task names, so every lmms-eval benchmark works unchanged. When
every requested task lives in the dataset's ``include_path`` (the embedded default), the task index is built from
those directories alone (``include_defaults=False``): no scan of lmms-eval's ~1,700 task YAMLs, no network.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import time
from numbers import Number
from pathlib import Path
from types import SimpleNamespace

from ..lmms import distributed
from ..lmms.records import sum_records
from ..options import ModelArgs
from .memory import PeakMemory
from .results import VariantResult, jsonable
from .schema import Config, DatasetConf

log = logging.getLogger("vtw")

# keys of an lmms-eval logged sample that are not per-sample scores
_SAMPLE_KEYS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "token_counts", "doc_hash"}
_SAMPLE_KEYS |= {"input_media"}


def build_task_manager(dataset: DatasetConf, tasks=None):
    """An lmms-eval ``TaskManager`` that knows ``tasks`` (default: the dataset's).

    Local-only tasks: indexed from ``dataset.include_path`` alone. Otherwise lmms-eval's full index plus the
    include path.
    """
    from lmms_eval.tasks import TaskManager

    tasks = list(tasks or dataset.tasks)
    include = list(dataset.include_path) or None
    if include:
        tm = TaskManager(include_path=include, include_defaults=False, verbosity="WARNING")
        if all(t in tm.all_tasks for t in tasks):
            return tm
    return TaskManager(include_path=include, verbosity="WARNING")


def check_tasks(task_manager, tasks, primary_metric: str | None = None) -> None:
    """``ValueError`` naming every unknown task, with the closest known names; and, when ``primary_metric``
    (``<task>/<metric>``) is given, naming it and the metrics its task reports (:func:`task_metrics`) when it is
    not one of them."""
    known = set(task_manager.all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        hints = {t: difflib.get_close_matches(t, known, n=5, cutoff=0.6) for t in bad}
        text = "; ".join(f"{t!r} (did you mean: {', '.join(h)})" if h else repr(t) for t, h in hints.items())
        raise ValueError(
            f"unknown lmms-eval task(s): {text}. List tasks with `python -m lmms_eval --tasks list`; local tasks need "
            "dataset.include_path"
        )
    if primary_metric:
        task, _, metric = primary_metric.partition("/")
        allowed = task_metrics(task_manager, task)
        if metric.split("@")[0] not in allowed:
            raise ValueError(
                f"dataset.primary_metric={primary_metric!r}: task {task!r} reports {list(allowed)} (lmms-eval's "
                f"{'aggregate_metric_list' if task_manager.task_index[task]['type'] == 'group' else 'metric_list'})"
            )


def task_metrics(task_manager, name: str) -> tuple[str, ...]:
    """The metric names lmms-eval reports for task ``name``: its YAML's ``metric_list`` (templates included); for
    a group, its ``aggregate_metric_list`` (a group without one reports no score of its own). Read from the task
    index without importing the task's code."""
    from lmms_eval.utils import load_yaml_config

    entry = task_manager.task_index[name]
    config = load_yaml_config(entry["yaml_path"], mode="simple")
    key = "aggregate_metric_list" if entry["type"] == "group" else "metric_list"
    items = config.get(key) or []
    items = [items] if isinstance(items, dict) else items
    return tuple(m["metric"] for m in items if isinstance(m, dict) and m.get("metric"))


def make_model(spec: Config, layer=None):
    """The ``vtw`` lmms-eval model for ``spec`` (weights loaded here), VTW at ``layer`` (``None``: the full model;
    each evaluation sets its method, :func:`evaluate_variant`)."""
    from ..lmms.model import VTWModel

    args = vars(ModelArgs.of(spec.model))
    return VTWModel(**args, layer=layer, positions=spec.vtw.positions, device=spec.device, progress=spec.progress)


def flatten_metrics(results: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from lmms-eval's ``results["results"]`` (and ``["groups"]``).

    Keys ``"<metric>,<filter>"``: filter ``none`` is dropped, any other becomes ``<metric>@<filter>``. Stderr
    entries (``*_stderr*``) and non-numeric values are skipped.
    """
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, entries in (results.get(section) or {}).items():
            for key, value in entries.items():
                if "," not in key:
                    continue
                metric, filt = key.split(",", 1)
                if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, Number):
                    continue
                name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}@{filt}"
                out.setdefault(name, float(value))
    return out


def primary_metric_name(results: dict, tasks, configured: str | None) -> str:
    """The configured ``<task>/<metric>``, else the first metric listed by the first task's config."""
    if configured:
        return configured
    cfg = (results.get("configs") or {}).get(tasks[0], {})
    for m in cfg.get("metric_list") or []:
        if isinstance(m, dict) and m.get("metric"):
            return f"{tasks[0]}/{m['metric']}"
    metrics = flatten_metrics(results)
    if metrics:
        return next(iter(metrics))
    raise ValueError(f"lmms-eval reported no metric for {tasks[0]!r}")


def _response(filtered: list):
    if len(filtered) == 1 and isinstance(filtered[0], str):
        return filtered[0]
    return jsonable(filtered)


def sample_rows(results: dict, records, *, label: str, layer, failures: dict | None = None) -> list[dict]:
    """One row per logged sample: response, target, per-sample scores, and its summed cost; a sample the model could
    not serve (``failures``: ``{(task, doc_id): message}``, e.g. an unreadable video) has its ``error`` instead."""
    costs = sum_records(records)
    failures = failures or {}
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            key = (task, int(s["doc_id"]))
            cost = costs.get(key)
            if cost is None and key not in failures:
                raise RuntimeError(f"no model measurement for task {task} doc {key[1]} (was the response cached?)")
            scores = {k: v for k, v in s.items() if k not in _SAMPLE_KEYS}
            row = {
                "variant": label,
                "layer": layer,
                "task": task,
                "doc_id": key[1],
                "target": s.get("target"),
                "response": _response(s.get("filtered_resps") or []),
                "scores": scores,
            }
            if cost is None:
                row["error"] = failures[key]
            else:
                row.update({k: v for k, v in cost.to_dict().items() if k not in ("task", "doc_id")})
            rows.append(jsonable(row))
    return rows


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def evaluate_variant(
    lm, spec: Config, task_manager, *, method, label: str, out_dir: str | Path, tasks=None, limit=None, budget=None
):
    """Evaluate ``lm`` under ``method`` (a :class:`vtw.methods.Reduction`) on the dataset's tasks; ``budget``: the
    :class:`vtw.flops.budget.BudgetMatch` that chose it, if any.

    Returns:
        ``(VariantResult, sample rows, primary metric name)`` on rank 0 (the whole evaluation's, gathered from every
        data-parallel rank); ``None`` on the other ranks.
    """
    from lmms_eval.evaluator import simple_evaluate

    tasks = list(tasks or spec.dataset.tasks)
    lm.set_method(method)
    layer = lm.layer
    lm.pop_records()
    mem = PeakMemory(lm.device)
    mem.start()
    t0 = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        limit=spec.dataset.limit if limit is None else limit,
        batch_size=spec.model.batch_size,
        log_samples=True,
        bootstrap_iters=spec.bootstrap_iters,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
        cli_args=SimpleNamespace(output_path=str(Path(out_dir) / "lmms_eval"), process_with_media=False),
        process_docs_parallel=1,
        verbosity="WARNING",
    )
    wall = time.perf_counter() - t0
    peak = mem.peak_gb()
    # data parallel: every rank's records, wall time, model time and peak memory, on rank 0 (lmms-eval gathered the
    # scores and samples there); the other ranks stop here
    records = lm.pop_records()
    ranks = distributed.gather((records, wall, sum(r.latency_s for r in records), peak, dict(lm.failures)))
    if ranks is None:
        return None
    records = [r for rank_records, *_ in ranks for r in rank_records]
    wall = max(w for _, w, _, _, _ in ranks)
    busiest = max(t for _, _, t, _, _ in ranks)  # model time of the slowest rank: the replicas run side by side
    failures = {k: v for *_, rank_failures in ranks for k, v in rank_failures.items()}
    peaks = [p for *_, p, _ in ranks if p is not None]
    peak = max(peaks) if peaks else None
    if results is None:
        raise RuntimeError("lmms-eval returned no results on rank 0")
    if len(ranks) > 1:
        _document_order(results)
    rows = sample_rows(results, records, label=label, layer=layer, failures=failures)
    primary = primary_metric_name(results, tasks, spec.dataset.primary_metric)
    result = _variant_result(lm, label, layer, flatten_metrics(results), primary, records, budget)
    result = dataclasses.replace(result, samples_per_s=result.num_samples / busiest if busiest > 0 else 0.0,
                                 peak_mem_gb=peak, peak_mem_kind=mem.kind, wall_s=wall, processes=len(ranks))  # fmt: skip
    return result, rows, primary


def _variant_result(lm, label: str, layer, metrics: dict, primary: str, records, budget) -> VariantResult:
    """The scores and the mean per-request cost of one evaluation (timing and memory: the caller's)."""
    costs = list(sum_records(records).values())
    flops, full = sum(c.flops for c in costs), sum(c.flops_full for c in costs)
    pflops, pfull = sum(c.paper_flops for c in costs), sum(c.paper_flops_full for c in costs)
    return VariantResult(
        label=label,
        layer=layer,
        method=lm.method.name,
        method_label=lm.handle.label,
        params=lm.method.params(),
        budget=None if budget is None else budget.budget,
        budget_ratio=None if budget is None else budget.ratio,
        metrics=metrics,
        accuracy=metrics.get(primary),
        num_samples=len(costs),
        tflops=_mean(c.flops for c in costs) / 1e12,
        tflops_full=_mean(c.flops_full for c in costs) / 1e12,
        tflops_expected=_mean(c.flops_expected for c in costs) / 1e12,
        tflops_saved_pct=100.0 * (1.0 - flops / full) if full else 0.0,
        paper_tflops=_mean(c.paper_flops for c in costs) / 1e12,
        paper_tflops_full=_mean(c.paper_flops_full for c in costs) / 1e12,
        paper_tflops_saved_pct=100.0 * (1.0 - pflops / pfull) if pfull else 0.0,
        latency_s=_mean(c.latency_s for c in costs),
        samples_per_s=0.0,
        generated_tokens=_mean(c.generated_tokens for c in costs),
        vision_tokens=_mean(c.vision_tokens for c in costs),
        text_tokens=_mean(c.text_tokens for c in costs),
        peak_mem_gb=None,
        peak_mem_kind=None,
        wall_s=0.0,
        processes=1,
    )


def _document_order(results: dict) -> None:
    """Put each task's gathered samples (rank 0's documents, then rank 1's, ...) back in the order one process logs
    them: by filter (first appearance), then document id."""
    for task, samples in (results.get("samples") or {}).items():
        filters: dict = {}
        for s in samples:
            filters.setdefault(s.get("filter"), len(filters))
        results["samples"][task] = sorted(samples, key=lambda s: (filters[s.get("filter")], int(s["doc_id"])))
