"""One job: config → validation → (resume?) → model → lmms-eval → results files → W&B → one-screen summary.

``run.py`` calls :func:`run_job` with the composed config and a :class:`JobContext` built from Hydra's runtime
(:meth:`JobContext.from_hydra`); tests call it directly with a context of their own. Every job writes, in its
output directory, ``job.json`` (status, atomically at start and end), and on success ``results.json`` +
``samples.jsonl`` (:mod:`vtw.pipeline.results`), or ``flops.json`` (``mode=flops``) / ``layer_search.json``
(``mode=search``, and ``vtw.layer=auto`` runs).
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ..io import atomic_write_bytes, atomic_write_json
from ..lmms import distributed
from .config import config_hash, resolved_config, validate_config
from .envinfo import git_info, lock_status, package_versions
from .layer import resolve_layer
from .loyalty import FIELDS as LOYALTY_FIELDS
from .loyalty import loyalty
from .results import RESULTS_FILE, SAMPLES_FILE, RunResult, write_results
from .schema import Config
from .status import JobStatus, job_index, now_iso, read_job_dir, record_finished

log = logging.getLogger("vtw")


@dataclass(frozen=True)
class JobContext:
    """Where and how a job runs.

    Attributes:
        output_dir: the job's directory (Hydra's ``runtime.output_dir``).
        sweep_dir: the sweep's directory in multirun (``None`` for a single run).
        job_num: the job's index in the sweep (Hydra's job number, under every launcher).
        multirun: whether Hydra runs a sweep (``-m``).
        overrides: the job's command-line overrides.
    """

    output_dir: Path
    sweep_dir: Path | None = None
    job_num: int | None = None
    multirun: bool = False
    overrides: tuple[str, ...] = ()

    @classmethod
    def from_hydra(cls) -> JobContext:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(
            output_dir=Path(hc.runtime.output_dir),
            sweep_dir=Path(hc.sweep.dir) if multirun else None,
            job_num=hc.job.num if multirun else None,
            multirun=multirun,
            overrides=tuple(hc.overrides.task),
        )

    @property
    def launch_dir(self) -> Path:
        """The sweep directory in a sweep (any launcher), else the run directory. Names the W&B group."""
        return self.sweep_dir if self.sweep_dir is not None else self.output_dir


@dataclass(frozen=True)
class JobOutcome:
    status: str  # ok | skipped | failed
    output_dir: Path
    result: RunResult | None = None
    resumed_from: Path | None = None


def _job_name(resolved: dict) -> str:
    from .wandb_logger import run_name

    layer = (resolved.get("vtw") or {}).get("layer")
    return run_name((resolved.get("model") or {}).get("name"), (resolved.get("dataset") or {}).get("name"), layer)


def find_finished(resolved: dict, output_dir: Path, resume_root: str | Path) -> Path | None:
    """A finished job directory with this config's hash: the job's own first (its ``results.json`` only: this job
    has just marked itself running), then the index of ``resume_root`` (:func:`vtw.pipeline.status.job_index`)."""
    want = config_hash(resolved)
    if read_job_dir(output_dir).config_hash == want:
        return Path(output_dir)
    if not Path(resume_root).is_dir():
        return None
    return job_index(resume_root).find(want)


def _adopt(found: Path, output_dir: Path) -> None:
    """Copy a finished job's results into this job's directory (so the sweep summary sees them)."""
    if found.resolve() == output_dir.resolve():
        return
    for name in (SAMPLES_FILE, RESULTS_FILE):  # results last: its presence means complete
        src = found / name
        if src.is_file():
            atomic_write_bytes(output_dir / name, src.read_bytes())


def _compare_baseline(spec: Config, ctx: JobContext, reduces: bool) -> bool:
    if not reduces:
        return False
    if spec.compare_baseline == "auto":
        return not ctx.multirun
    return bool(spec.compare_baseline)


def run_job(cfg: DictConfig | dict, ctx: JobContext, *, console=None) -> JobOutcome:
    """Run one job; see the module docstring. Failures are recorded in ``job.json`` and re-raised."""
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    distributed.init()  # data parallel (WORLD_SIZE > 1): join the process group; one process: nothing
    rank = distributed.world().rank
    status = JobStatus(out, overrides=ctx.overrides, job_num=ctx.job_num, rank=rank)
    status.start()
    try:
        resolved = resolved_config(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
        status.update(
            name=_job_name(resolved),
            config_hash=config_hash(resolved),
            model=(resolved.get("model") or {}).get("name"),
            dataset=(resolved.get("dataset") or {}).get("name"),
            layer=(resolved.get("vtw") or {}).get("layer"),
            mode=resolved.get("mode"),
        )
        spec = validate_config(resolved)
        if spec.resume and spec.mode == "eval":
            found = distributed.broadcast(find_finished(resolved, out, spec.resume_root) if rank == 0 else None)
            if found is not None:
                if rank == 0:
                    _adopt(found, out)
                log.info("resume: %s already has results for this config; skipping", found)
                status.finish("skipped", resumed_from=str(found))
                return JobOutcome("skipped", out, resumed_from=found)
        if spec.mode != "eval":
            wandb_info = _run_other_mode(spec, out, ctx, console)
            status.finish("ok", **({} if wandb_info is None else {"wandb": wandb_info}))
            return JobOutcome("ok", out)
        evaluated = _run_eval(spec, resolved, ctx)
        if evaluated is None:  # a data-parallel rank > 0: rank 0 writes the results, W&B and the summary
            status.finish("ok")
            return JobOutcome("ok", out)
        result, samples = evaluated
        write_results(out, result, samples)
        from .wandb_logger import default_group, log_job

        wandb_info = log_job(spec.logger, result, samples, out_dir=out, group=default_group(ctx.launch_dir))
        status.finish("ok", wandb=wandb_info)
        record_finished(result.config_hash, out)
        from .report import print_run_summary

        print_run_summary(result, out, wandb_info, console=console)
        return JobOutcome("ok", out, result=result)
    except BaseException as e:
        status.fail(e, traceback.format_exc())
        raise


def _run_other_mode(spec: Config, out: Path, ctx: JobContext, console) -> dict | None:
    """``mode=flops|search|choose|analyze`` (what each writes: the module docstring); the W&B info of an analysis."""
    if spec.mode == "flops":
        _run_flops(spec, out, console)
    elif spec.mode == "search":
        _run_search(spec, out)
    elif spec.mode == "choose":
        _run_choose(spec, out, console)
    else:
        from .analyze import run_analyze
        from .wandb_logger import default_group, log_analysis

        analysis, verdict = run_analyze(spec, out)
        wandb_info = log_analysis(spec, analysis, out, group=default_group(ctx.launch_dir), verdict=verdict)
        (console or _print)(f"analysis: {verdict}\nwrote {out}/analysis.json and {out}/attention_share.png, "
                            "migration.png, attention_map.png")  # fmt: skip
        return wandb_info
    return None


def _run_eval(spec: Config, resolved: dict, ctx: JobContext) -> tuple[RunResult, list[dict]] | None:
    """Evaluate the job (and the baseline when it compares): ``(result, sample rows)``; ``None`` on a
    data-parallel rank > 0 (it evaluated its share of the documents; rank 0 holds the whole)."""
    from .evaluate import build_task_manager, check_tasks, make_model

    started = now_iso()
    tm = build_task_manager(spec.dataset)
    check_tasks(tm, spec.dataset.tasks, spec.dataset.primary_metric)  # unknown task / metric: before the weights load
    calibration = _calibration(spec, tm)  # vtw.method=auto: an empty calibration set fails before the weights load
    lm = make_model(spec)
    main_rank = distributed.world().main
    # the layer search, the choice of vtw.method=auto and the budget match run once, on rank 0; every rank evaluates
    # what rank 0 chose
    layer = resolve_layer(spec, lm=lm, task_manager=tm, out_dir=ctx.output_dir) if main_rank else None
    layer = distributed.broadcast(layer)
    choice = None
    if calibration is not None and layer is not None:
        from .choose import run_choose

        choice = distributed.broadcast(run_choose(spec, lm, layer, *calibration, ctx.output_dir) if main_rank else None)
        spec = spec.with_vtw(method=choice["choice"]["chosen"])
    method, match = spec.reduction(layer).resolve(spec.model.num_layers), None
    if spec.vtw.budget is not None and layer is not None:
        from .budget import match_job_budget

        match = distributed.broadcast(match_job_budget(spec, lm, tm, method) if main_rank else None)
        method = match.method
    evaluated = _evaluate_variants(spec, lm, tm, ctx, method, match)
    if evaluated is None:
        return None
    (main, baseline, primary), samples = evaluated
    result = _run_result(spec, resolved, ctx, lm, (main, baseline, primary), match, choice, started)
    return result, samples


def _evaluate_variants(spec: Config, lm, tm, ctx: JobContext, method, match):
    """The baseline (when the job compares) and ``method``: ``((main, baseline, primary metric), sample rows)``, the
    loyalty of ``main`` to the baseline filled in; ``None`` on a data-parallel rank > 0."""
    from .evaluate import evaluate_variant

    reduces = any(k < spec.model.num_layers for k in method.stages())
    samples: list[dict] = []
    baseline = None
    base_rows = None
    if _compare_baseline(spec, ctx, reduces):
        lm.first_token_store = {}  # the full model's first-token distributions, the reference of the next variant
        try:
            evaluated = evaluate_variant(
                lm, spec, tm, method=spec.reduction(None), label="baseline", out_dir=ctx.output_dir
            )
        finally:  # each rank keeps the reference of its own documents (the same split in both evaluations)
            lm.first_token_reference, lm.first_token_store = lm.first_token_store, None
        if evaluated is not None:
            baseline, base_rows, _ = evaluated
            samples += base_rows
    label = spec.vtw.method if reduces else "baseline"
    try:
        evaluated = evaluate_variant(lm, spec, tm, method=method, label=label, out_dir=ctx.output_dir, budget=match)
    finally:
        lm.first_token_reference = None
    if evaluated is None:
        return None
    main, rows, primary = evaluated
    samples += rows
    if base_rows is not None:  # loyalty to the full model, on the same samples
        self_loyal = loyalty(base_rows, base_rows)
        self_loyal["first_token_kl"] = None if self_loyal["first_token_agreement"] is None else 0.0
        baseline = dataclasses.replace(baseline, **{k: self_loyal[k] for k in LOYALTY_FIELDS})
        main = dataclasses.replace(main, **{k: v for k, v in loyalty(rows, base_rows).items() if k in LOYALTY_FIELDS})
    return (main, baseline, primary), samples


def _run_result(spec: Config, resolved: dict, ctx: JobContext, lm, variants, match, choice, started) -> RunResult:
    """The job's :class:`~vtw.pipeline.results.RunResult` (one result schema: CSV, Markdown, the table, W&B)."""
    from ..flops import PAPER_CONVENTION
    from ..flops.plan import EXACT_CONVENTION

    main, baseline, primary = variants
    return RunResult(
        name=_job_name(resolved),
        model=spec.model.name,
        pretrained=spec.model.pretrained,
        family=spec.model.family,
        num_layers=spec.model.num_layers,
        dataset=spec.dataset.name,
        tasks=list(spec.dataset.tasks),
        limit=spec.dataset.limit,
        layer_requested=spec.vtw.layer,
        primary_metric=primary,
        budget=None if match is None else match.to_dict(),
        choice=choice,
        result=main,
        baseline=baseline,
        config=resolved,
        config_hash=config_hash(resolved),
        git=git_info(),
        packages=package_versions(),
        lock=lock_status(),
        job={
            "output_dir": str(Path(ctx.output_dir).resolve()),
            "sweep_dir": None if ctx.sweep_dir is None else str(Path(ctx.sweep_dir).resolve()),
            "job_num": ctx.job_num,
            "overrides": list(ctx.overrides),
            "started": started,
            "finished": now_iso(),
            "device": str(lm.device),
            "device_map": lm.device_map,
            "processes": main.processes,
            "dtype": str(lm.dtype).replace("torch.", ""),
        },
        conventions={"tflops": EXACT_CONVENTION, "paper_tflops": PAPER_CONVENTION},
    )


def _calibration(spec: Config, task_manager) -> tuple[list, dict] | None:
    """``vtw.method=auto``'s calibration documents and their sources (:mod:`vtw.pipeline.choose`), else ``None``."""
    if not spec.vtw.auto:
        return None
    from .choose import prepare_choice

    return prepare_choice(spec, task_manager)


def _run_choose(spec: Config, out: Path, console) -> None:
    """``mode=choose``: only the choice of ``vtw.method=auto`` (``choose.json`` / ``.png`` in the job dir)."""
    from .choose import print_choice, run_choose
    from .evaluate import build_task_manager, check_tasks, make_model

    tasks = list(spec.vtw.choose.tasks or spec.dataset.tasks)
    tm = build_task_manager(spec.dataset, tasks)
    check_tasks(tm, tasks)
    calibration = _calibration(spec, tm)
    lm = make_model(spec)
    layer = resolve_layer(spec, lm=lm, task_manager=tm, out_dir=out)
    if layer is None:
        raise ValueError("mode=choose with vtw.layer=null: the full model has nothing to choose; give vtw.layer")
    print_choice(run_choose(spec, lm, layer, *calibration, out), out, console)


def _run_flops(spec: Config, out: Path, console) -> None:
    from ..flops import plan_flops
    from .report import make_console

    f, layer = spec.flops, spec.vtw.layer
    plan = plan_flops(
        spec.model.config_ref,
        text_tokens=int(f.text_tokens),
        generated_tokens=int(f.generated_tokens),
        image_size=tuple(f.image_size) if f.image_size else None,
        video_frames=int(f.video_frames or 0),
        console=console or make_console(),
        method=spec.reduction(layer) if isinstance(layer, int) else None,  # a peer: its settings
    )
    rows = [dataclasses.asdict(r) | {"tflops": r.tflops, "paper_tflops": r.paper_tflops} for r in plan.rows]
    atomic_write_json(
        out / "flops.json",
        {
            "model": spec.model.name,
            "config": spec.model.config_ref,
            "vision_tokens": plan.vision_tokens,
            "text_tokens": plan.text_tokens,
            "generated_tokens": plan.generated_tokens,
            "encoder": plan.encoder_note,
            "rows": rows,
        },
    )


def _print(text: str) -> None:
    from .report import make_console

    make_console().print(text)


def _run_search(spec: Config, out: Path) -> None:
    """``mode=search``: only the layer search (``layer_search.json`` / ``.png`` in the job dir)."""
    from .evaluate import build_task_manager, check_tasks, make_model

    tasks = list(spec.vtw.search.tasks or spec.dataset.tasks)
    tm = build_task_manager(spec.dataset, tasks)
    check_tasks(tm, tasks)
    lm = make_model(spec)
    layer = resolve_layer(spec.with_vtw(layer="auto"), lm=lm, task_manager=tm, out_dir=out)
    log.info("layer search: K=%s for %s (details in %s/layer_search.json)", layer, spec.model.name, out)
