"""Weights & Biases logging: one run per job, one summary run per sweep. Never loses local results.

* Job run: ``group`` = the sweep (or ``logger.group``), ``name`` = ``<model>-<dataset>-K<layer>``, ``config`` = the
  resolved config, summary = :meth:`RunResult.summary` (``<task>/<metric>``, ``tflops``, ``tflops_saved_pct``,
  ``latency_s``, ``peak_mem_gb``, ...; the baseline's under ``baseline/``), and a per-sample ``wandb.Table``.
* Sweep run (``job_type=sweep``, same group): the summary table (the rows' :data:`~vtw.pipeline.results.COLUMNS`
  shown in ``wandb``), a scatter of accuracy vs TFLOPs, ``pareto.png``.
* Mode ``online | offline | disabled`` from ``logger.mode``. ``online`` without credentials (``WANDB_API_KEY`` or
  ``~/.netrc``) falls back to ``offline`` and says how to upload: ``wandb sync <dir>``. The run files go to
  ``<job dir>/wandb`` (``<sweep dir>/wandb`` for the sweep run).
* Every W&B call is guarded: an error is reported (returned, logged, recorded in ``job.json``), never raised; it is
  made after ``results.json`` is written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .resolvers import layer_tag, slug
from .results import WANDB, RunResult, columns
from .schema import LoggerConf

log = logging.getLogger("vtw")

SAMPLE_COLUMNS = (
    "variant",
    "layer",
    "task",
    "doc_id",
    "target",
    "response",
    "score",
    "tflops",
    "tflops_full",
    "latency_s",
    "generated_tokens",
    "vision_tokens",
    "text_tokens",
)


def has_credentials() -> bool:
    """Whether W&B would find an API key (environment or ~/.netrc) without asking."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return bool(read_netrc_auth(host=host))
    except Exception:  # noqa: BLE001 - any trouble reading credentials means: none
        return False


def resolve_mode(requested: str) -> tuple[str, str | None]:
    """``(mode, message)``: ``online`` without credentials becomes ``offline`` with an explanation."""
    if requested == "online" and not has_credentials():
        return "offline", "no W&B credentials (WANDB_API_KEY or `wandb login`): logging offline instead"
    return requested, None


def default_group(ctx_dir: Path) -> str:
    """W&B group of a launch: ``<parent>-<dir>`` of the sweep (or run) directory, e.g. ``2026-11-24-11-29-25-ab12cd``."""
    ctx_dir = Path(ctx_dir).resolve()
    return slug(f"{ctx_dir.parent.name}-{ctx_dir.name}")


def run_name(result_or_model, dataset: str | None = None, layer=None) -> str:
    """``<model>-<dataset>-<K12 | base | auto>``."""
    if isinstance(result_or_model, RunResult):
        r = result_or_model
        tag = layer_tag(None if r.layer == r.num_layers else r.layer)
        method = r.result.method
        return (
            f"{r.model}-{r.dataset}-{tag}"
            if method == "vtw" or r.layer is None
            else f"{r.model}-{r.dataset}-{method}-{tag}"
        )
    return f"{result_or_model}-{dataset}-{layer_tag(layer)}"


def _sample_row(s: dict) -> list:
    """A ``samples.jsonl`` row as the values of :data:`SAMPLE_COLUMNS` (``score``: its first numeric score)."""
    scores = s.get("scores") or {}
    score = next((v for v in scores.values() if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    resp, target = s.get("response"), s.get("target")
    shown = {**s, "score": score, "response": resp if isinstance(resp, str) else str(resp)}
    shown["target"] = None if target is None else str(target)
    return [shown.get(c) for c in SAMPLE_COLUMNS]


def _init(spec: LoggerConf, *, out_dir: Path, group: str, name: str, config: dict, job_type: str):
    import wandb

    mode, message = resolve_mode(spec.mode)
    if message:
        log.warning(message)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=spec.project,
        entity=spec.entity,
        group=group,
        name=name,
        job_type=job_type,
        tags=list(spec.tags) or None,
        config=config,
        dir=str(out_dir),
        mode=mode,
        reinit="create_new",
        settings=wandb.Settings(init_timeout=120, console="off", x_disable_stats=True, silent=True),
    )
    return run, mode


def _finish_info(run, mode: str, group: str) -> dict:
    run_dir = Path(run.dir).parent  # <dir>/wandb/<offline-run-...>/files -> the run's directory
    info = {"status": "logged", "mode": mode, "run_id": run.id, "group": group, "run_dir": str(run_dir)}
    if mode == "offline":
        info["sync"] = f"wandb sync {run_dir}"
    return info


def _failed(run, error: Exception, message: str) -> dict:
    """After W&B trouble: warn (`message` takes the error's type and text), close `run` as failed if it was opened,
    and return the ``failed`` status; never raises."""
    log.warning(message, type(error).__name__, error)
    if run is not None:
        try:
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    return {"status": "failed", "error": f"{type(error).__name__}: {error}"}


def _log_choice(run, outcome: dict | None, plot: Path) -> None:
    """With ``vtw.method=auto``: the chosen method, its cost and the table of every candidate, and the plot."""
    if outcome is None:
        return
    import wandb

    from ..choose import Choice
    from .choose import TABLE_COLUMNS, choice_table

    choice = Choice.from_dict(outcome["choice"])
    run.summary.update({"choose/method": choice.chosen, "choose/budget": choice.budget,
                        "choose/prefills_per_prompt": choice.cost["prefills_per_prompt"],
                        "choose/reused_cache": outcome["reused_cache"]})  # fmt: skip
    payload = {"choose": wandb.Table(columns=TABLE_COLUMNS, data=choice_table(choice))}
    if plot.exists():
        payload["choose_plot"] = wandb.Image(str(plot))
    run.log(payload)


def _log_layer_search(run, path: Path) -> None:
    """With ``vtw.layer=auto``: the chosen K, eta, the KL-per-layer table and the plot of the job's layer search."""
    if not path.exists():
        return
    import json

    import wandb

    found = json.loads(path.read_text())
    run.summary.update(
        {
            "layer_search/K": found["layer"],
            "layer_search/eta": found["eta"],
            "layer_search/reused_cache": found["reused_cache"],
        }
    )
    rows = [[int(k), float(v)] for k, v in sorted(found["kl"].items(), key=lambda kv: int(kv[0]))]
    payload = {"layer_search": wandb.Table(columns=["layer", "mean_kl"], data=rows)}
    if path.with_suffix(".png").exists():
        payload["layer_search_plot"] = wandb.Image(str(path.with_suffix(".png")))
    run.log(payload)


def log_job(spec: LoggerConf, result: RunResult, samples: list[dict], *, out_dir: str | Path, group: str) -> dict:
    """Log one job; returns what happened (``status``: ``logged`` | ``disabled`` | ``failed``), never raises."""
    if spec.name != "wandb" or spec.mode == "disabled":
        return {"status": "disabled"}
    run = None
    try:
        import wandb

        group = spec.group or group
        run, mode = _init(
            spec, out_dir=Path(out_dir), group=group, name=run_name(result), config=result.config, job_type="eval"
        )
        run.summary.update({k: v for k, v in result.summary().items() if v is not None})
        run.summary["config_hash"] = result.config_hash
        if spec.log_samples and samples:
            run.log({"samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=[_sample_row(s) for s in samples])})
        _log_layer_search(run, Path(out_dir) / "layer_search.json")
        _log_choice(run, result.choice, Path(out_dir) / "choose.png")
        info = _finish_info(run, mode, group)
        run.finish()
        return info
    except Exception as e:  # noqa: BLE001 - W&B trouble never fails the job
        return _failed(run, e, "W&B logging failed (%s: %s); local results are complete")


def log_sweep(spec: LoggerConf, summary, *, group: str) -> dict:
    """Log a sweep's summary run (table, accuracy-vs-TFLOPs scatter, Pareto image); never raises."""
    if spec.name != "wandb" or spec.mode == "disabled":
        return {"status": "disabled"}
    run = None
    try:
        import wandb

        group = spec.group or group
        rows = summary.rows
        shown = [c.name for c in columns(WANDB)]
        run, mode = _init(
            spec,
            out_dir=Path(summary.sweep_dir),
            group=group,
            name=f"sweep-{slug(Path(summary.sweep_dir).name)}",
            config={"sweep_dir": str(summary.sweep_dir), "jobs": summary.jobs},
            job_type="sweep",
        )
        table = wandb.Table(columns=shown, data=[[r.get(c) for c in shown] for r in rows])
        payload = {"summary_table": table}
        points = [
            [r["tflops"], r["accuracy"], r["label"], "baseline" if r.get("layer") is None else r.get("method")]
            for r in rows
            if r.get("accuracy") is not None and r.get("tflops")
        ]
        if points:  # the method column groups the points in W&B's chart editor
            pts = wandb.Table(columns=["tflops", "accuracy", "label", "method"], data=points)
            payload["accuracy_vs_tflops"] = wandb.plot.scatter(
                pts, "tflops", "accuracy", title="accuracy vs TFLOPs per sample"
            )
        if summary.paths.get("pareto") and Path(summary.paths["pareto"]).is_file():
            payload["pareto"] = wandb.Image(str(summary.paths["pareto"]))
        run.log(payload)
        run.summary.update({"jobs": summary.jobs, "jobs_ok": summary.ok, "jobs_failed": summary.failed})
        info = _finish_info(run, mode, group)
        run.finish()
        return info
    except Exception as e:  # noqa: BLE001 - W&B trouble never fails the sweep
        return _failed(run, e, "W&B sweep logging failed (%s: %s); local summaries are complete")


def log_analysis(spec, analysis, out_dir: str | Path, *, group: str, verdict: str) -> dict:
    """``mode=analyze``: one W&B run with the three figures, the per-layer table and the verdict; never raises."""
    logger = spec.logger
    if logger.name == "none" or logger.mode == "disabled":
        return {"status": "disabled"}
    run = None
    try:
        import wandb

        from .analyze import FIGURES

        out_dir = Path(out_dir)
        run, mode = _init(logger, out_dir=out_dir, group=logger.group or group, name=f"{spec.model.name}-"
                          f"{spec.dataset.name}-analyze", config={"mode": "analyze"}, job_type="analyze")  # fmt: skip
        columns = ["layer", *(f"text_{k}" for k in analysis.text_shares), *(f"last_{k}" for k in analysis.last_shares),
                   "kl", "top1_agreement"]  # fmt: skip
        data = [
            [i, *(v[i] for v in analysis.text_shares.values()), *(v[i] for v in analysis.last_shares.values()),
             analysis.kl[i], analysis.top1_agreement[i]]
            for i in range(analysis.num_layers)
        ]  # fmt: skip
        payload = {"analysis": wandb.Table(columns=columns, data=data)}
        payload.update({name[:-4]: wandb.Image(str(out_dir / name)) for name in FIGURES if (out_dir / name).exists()})
        run.log(payload)
        run.summary["verdict"] = verdict
        info = _finish_info(run, mode, logger.group or group)
        run.finish()
        return info
    except Exception as e:  # noqa: BLE001 - W&B never fails a job
        return _failed(run, e, "W&B analysis logging failed (%s: %s)")
