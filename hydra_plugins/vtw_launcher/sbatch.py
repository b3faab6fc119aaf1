"""``launcher=sbatch``: a sweep as ONE ``sbatch --array``, submitted without waiting for it.

``python run.py -m launcher=sbatch vtw.layer=8,12,16 [hydra.launcher.partition=gpu ...]``: Hydra's own sweeper
expands the overrides and hands the jobs to :class:`SbatchLauncher`, which

1. fixes each point's job directory: Hydra's ``${hydra.sweep.dir}/${hydra.sweep.subdir}`` for that job (resolved
   once, here, and recorded), so a requeued or resubmitted task runs in the same directory;
2. writes the submission into ``<sweep dir>/.sbatch/<n>/``: ``plan.json`` (the points: index, directory, overrides;
   the layer searches), ``launch.pkl`` (the sweep's config, Hydra's context and the task function's location, what
   a task needs to run its job exactly as the local launcher would), ``task.sh`` and ``summary.sh``;
3. submits, with ``sbatch``: when points have ``vtw.layer=auto``, one ``mode=search`` job per distinct point as a
   first array (the layer search fills the shared cache, so the points read their layer from it); the array of the
   points without results (``--requeue``, ``--dependency=afterok`` on the search), each task running its point
   through Hydra's ``run_job`` in its directory; a summary job after the array (``afterany``) that writes
   ``summary.csv`` / ``summary.md`` / ``pareto.png``, ``status.tsv`` and the W&B sweep run;
4. returns at once (the end-of-sweep callback does not summarise here: ``conf/launcher/sbatch.yaml``).

Resubmission is the same command with ``resume=true`` and the same ``hydra.sweep.dir=DIR``: the array lists only
the points whose directory is not finished (:func:`vtw.pipeline.status.read_job_dir`). Before submitting, the GPU
check and the one-line sbatch refusal of ``launcher=slurm`` apply (:mod:`.checks`), and a failed submission leaves
nothing behind.

Array task ``i`` runs ``python -m hydra_plugins.vtw_launcher.sbatch task SUBMISSION point i``; the summary job
``... summary SUBMISSION``.
"""

import copy
import importlib
import inspect
import json
import logging
import os
import pickle
import runpy
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .checks import gpu_mismatch, partition_gres, sbatch_refusal, tree_of, undo_submission

log = logging.getLogger("vtw")

SUBMISSIONS_DIR = ".sbatch"
PLAN_FILE = "plan.json"
STATE_FILE = "launch.pkl"
STATUS_FILE = "status.tsv"
SEARCH_DIR = ".search"
#: overrides that may differ when a sweep is resubmitted (they do not change what a point computes)
RESUBMIT_KEYS = ("resume", "resume_root")


@dataclass
class SbatchLauncherConf:
    """``hydra.launcher.*`` of ``launcher=sbatch`` (the same names as ``launcher=slurm`` where both have them)."""

    _target_: str = "hydra_plugins.vtw_launcher.sbatch.SbatchLauncher"
    partition: str | None = None  # the cluster's default partition when null
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = 1  # null (or 0) for CPU-only partitions: no --gpus-per-node at all
    cpus_per_task: int = 8
    mem_gb: int | None = 32  # null: the partition's default
    timeout_min: int = 240
    array_parallelism: int | None = 16  # at most this many array tasks at once (--array=...%N); null: no bound
    constraint: str | None = None
    exclude: str | None = None
    name: str = "vtw-${hydra.job.name}"  # job name; the search and summary jobs add -search / -summary
    # Shell lines run in every job before python starts, e.g. ["module load cuda/12.1"]. Jobs run the submitter's
    # python in the submitter's working directory, and sbatch exports the submitter's environment.
    setup: list[str] = field(default_factory=list)
    # Any other sbatch option, for every job: +hydra.launcher.additional_parameters.mail-type=END
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    layer_search: bool = True  # run the layer search as a first array when points have vtw.layer=auto
    summary_timeout_min: int = 30


ConfigStore.instance().store(group="hydra/launcher", name="sbatch", node=SbatchLauncherConf, provider="vtw")


# ------------------------------------------------------------------------------------------------ plans
def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def format_indices(indices: Sequence[int]) -> str:
    """Indices as a SLURM ``--array`` list with runs collapsed: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ordered, parts = sorted(set(indices)), []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def submissions(sweep_dir: str | os.PathLike) -> list[Path]:
    """The submission folders of a sweep, oldest first."""
    root = Path(sweep_dir) / SUBMISSIONS_DIR
    subs = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return sorted(subs, key=lambda p: int(p.name))


def read_plan(sweep_dir_or_submission: str | os.PathLike) -> dict:
    """``plan.json`` of a submission folder, or of the latest submission of a sweep directory."""
    path = Path(sweep_dir_or_submission)
    if not (path / PLAN_FILE).is_file():
        subs = submissions(path)
        if not subs:
            raise ValueError(f"{str(path)!r} holds no sweep submitted with launcher=sbatch")
        path = subs[-1]
    return json.loads((path / PLAN_FILE).read_text())


def point_states(sweep_dir: str | os.PathLike, plan: dict) -> list[tuple[int, str, str]]:
    """``(index, state, dir)`` of every point (:func:`vtw.pipeline.status.job_state`)."""
    from vtw.pipeline.status import job_state

    return [(p["index"], job_state(Path(sweep_dir) / p["dir"]), p["dir"]) for p in plan["points"]]


def status_table(sweep_dir: str | os.PathLike, plan: dict) -> str:
    """Tab-separated ``index  status  dir`` lines (with a header) for every point."""
    rows = ["index\tstatus\tdir", *("\t".join(map(str, row)) for row in point_states(sweep_dir, plan))]
    return "".join(r + "\n" for r in rows)


def _same_point(a: Sequence[str], b: Sequence[str]) -> bool:
    return [o for o in a if _key(o) not in RESUBMIT_KEYS] == [o for o in b if _key(o) not in RESUBMIT_KEYS]


# ------------------------------------------------------------------------------------------------ submitting
def _sbatch_options(p: dict) -> tuple[list[str], list[str]]:
    """(options of every job, resources of the search and point tasks) from the launcher settings."""
    common = [f"--{k}={p[k]}" for k in ("partition", "account", "qos", "constraint", "exclude") if p.get(k)]
    for k, v in (p.get("additional_parameters") or {}).items():
        common.append(f"--{k}" if v is True else f"--{k}={v}")
    task = [f"--cpus-per-task={p['cpus_per_task']}", f"--time={p['timeout_min']}", "--requeue", "--open-mode=append"]
    if p.get("mem_gb"):
        task.append(f"--mem={p['mem_gb']}G")
    if p.get("gpus_per_node"):
        task.append(f"--gpus-per-node={p['gpus_per_node']}")
    return common, task


def _sbatch(args: list[str]) -> str:
    """Submit; the job id. sbatch's refusal is a :class:`SystemExit` with one line."""
    try:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SystemExit(
            "vtw: sbatch not found: launcher=sbatch needs a SLURM cluster. Nothing was submitted."
        ) from None
    if out.returncode != 0:
        raise SystemExit(sbatch_refusal(out.stderr or out.stdout))
    return out.stdout.strip().split(";")[0]


def _script(sweep_dir: Path, setup: Sequence[str], command: str) -> str:
    code_root = Path(__file__).resolve().parents[2]  # the code this submitter runs: the jobs import the same
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by launcher=sbatch for the sweep in {sweep_dir}.",
        "set -euo pipefail",
        'echo "[vtw] $(date -Is) host=$(hostname) job=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}_${SLURM_ARRAY_TASK_ID:-}'
        ' restart=${SLURM_RESTART_COUNT:-0} $*"',
        f"cd {shlex.quote(os.getcwd())}",
        f"export PYTHONPATH={shlex.quote(str(code_root))}${{PYTHONPATH:+:$PYTHONPATH}}",
        *setup,
        f"exec {shlex.quote(sys.executable)} -m hydra_plugins.vtw_launcher.sbatch {command}",
    ]
    return "\n".join(lines) + "\n"


def _task_location(fn: TaskFunction) -> dict:
    """Where a task process finds the task function again (the script of ``__main__``, else the module)."""
    if fn.__module__ == "__main__":
        return {"file": str(Path(inspect.getsourcefile(fn)).resolve()), "name": fn.__name__}
    return {"module": fn.__module__, "name": fn.__name__}


def _load_task(where: dict) -> TaskFunction:
    """The task function (the one ``@hydra.main`` wraps): the script is run as a module (not as ``__main__``), so
    its top-level set-up, e.g. registering resolvers, runs as it does under ``python run.py``."""
    if "file" in where:
        fn = runpy.run_path(where["file"], run_name="__vtw_task__")[where["name"]]
    else:
        fn = getattr(importlib.import_module(where["module"]), where["name"])
    return getattr(fn, "__wrapped__", fn)


class SbatchLauncher(Launcher):
    """See the module docstring."""

    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}  # fmt: skip
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _point_config(self, config: DictConfig, overrides: Sequence[str], num: int) -> DictConfig:
        assert self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return cfg

    def _subdir(self, cfg: DictConfig) -> str:
        """Hydra's ``hydra.sweep.subdir`` of this job, resolved as ``run_job`` would."""
        orig = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)
        try:
            return str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        finally:
            HydraConfig.instance().cfg = orig

    def _plan(self, master: DictConfig, job_overrides: Sequence[Sequence[str]], sweep_dir: Path) -> dict:
        """The points (index, fixed directory, overrides), the layer searches the pending ones need, the pending
        indices. A resubmission keeps the directories of the previous submission and must be the same sweep."""
        from vtw.pipeline.status import job_state

        previous = read_plan(sweep_dir) if submissions(sweep_dir) else None
        if previous is not None and len(previous["points"]) != len(job_overrides):
            raise SystemExit(
                f"vtw: hydra.sweep.dir={sweep_dir} holds a sweep of {len(previous['points'])} points, this one has "
                f"{len(job_overrides)}; resubmit the same command (with resume=true) or pick a new hydra.sweep.dir"
            )
        points, searches = [], {}
        for i, overrides in enumerate(job_overrides):
            cfg = self._point_config(master, overrides, i)
            if previous is not None:
                was = previous["points"][i]
                if not _same_point(was["overrides"], overrides):
                    raise SystemExit(
                        f"vtw: hydra.sweep.dir={sweep_dir} holds another sweep: its point {i} is "
                        f"{' '.join(was['overrides'])!r}, now {' '.join(overrides)!r}; resubmit the same command "
                        "(with resume=true) or pick a new hydra.sweep.dir"
                    )
                subdir = was["dir"]
            else:
                subdir = self._subdir(cfg)
            points.append({"index": i, "dir": subdir, "overrides": list(overrides)})
            if str(OmegaConf.select(cfg, "vtw.layer")) == "auto":
                searches.setdefault((*(o for o in overrides if _key(o) != "mode"), "mode=search"), i)
        pending = [pt["index"] for pt in points if job_state(sweep_dir / pt["dir"]) not in ("ok", "skipped")]
        if not self.params.get("layer_search", True):
            searches = {}
        wanted = [s for s, i in searches.items() if i in set(pending)]
        search_jobs = [{"index": k, "dir": f"{SEARCH_DIR}/{k}", "overrides": list(s)} for k, s in enumerate(wanted)]
        return {"sweep_dir": str(master.hydra.sweep.dir), "points": points, "searches": search_jobs, "pending": pending}

    def _write(self, sub: Path, plan: dict, master: DictConfig) -> None:
        """The submission folder: the plan, the launch state and the two batch scripts."""
        from vtw.io import atomic_write_bytes, atomic_write_json

        assert self.task_function is not None
        atomic_write_json(sub / PLAN_FILE, plan, indent=1)
        state = {
            "config": master,
            "hydra_context": self.hydra_context,
            # Hydra's singletons (the config store, ...) without the resolvers: the task's own set-up registers them
            "singletons": Singleton.get_state()["instances"],
            "task": _task_location(self.task_function),
        }
        atomic_write_bytes(sub / STATE_FILE, pickle.dumps(state))
        setup = list(self.params.get("setup") or [])
        task = f'task {shlex.quote(str(sub))} "$1" "$SLURM_ARRAY_TASK_ID"'
        (sub / "task.sh").write_text(_script(sub.parents[1], setup, task))
        (sub / "summary.sh").write_text(_script(sub.parents[1], setup, f"summary {shlex.quote(str(sub))}"))

    def _submit(self, sub: Path, plan: dict, submitted: list[str]) -> dict[str, str]:
        """sbatch the search array, the points' array and the summary job (ids appended to ``submitted``)."""
        p, logs = self.params, sub.parents[1] / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        common, task = _sbatch_options(p)
        name = str(p.get("name") or "vtw")
        ids = {"search": "", "array": ""}
        if plan["pending"]:
            after: list[str] = []
            if plan["searches"]:
                ids["search"] = _sbatch([*common, *task, f"--job-name={name}-search",
                                         f"--array=0-{len(plan['searches']) - 1}",
                                         f"--output={logs}/search_%A_%a.out", str(sub / "task.sh"), "search"])  # fmt: skip
                submitted.append(ids["search"])
                after = [f"--dependency=afterok:{ids['search']}", "--kill-on-invalid-dep=yes"]
            array = format_indices(plan["pending"])
            if p.get("array_parallelism"):
                array += f"%{p['array_parallelism']}"
            ids["array"] = _sbatch([*common, *task, *after, f"--job-name={name}", f"--array={array}",
                                    f"--output={logs}/%A_%a.out", str(sub / "task.sh"), "point"])  # fmt: skip
            submitted.append(ids["array"])
        after = [f"--dependency=afterany:{ids['array']}", "--kill-on-invalid-dep=no"] if ids["array"] else []
        ids["summary"] = _sbatch([*common, *after, f"--job-name={name}-summary", "--cpus-per-task=1",
                                  f"--time={p.get('summary_timeout_min', 30)}", f"--output={logs}/summary_%j.out",
                                  str(sub / "summary.sh")])  # fmt: skip
        return ids

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        if initial_job_idx != 0:
            raise SystemExit(
                "vtw: launcher=sbatch submits a whole sweep as one array; unset hydra.sweeper.max_batch_size"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        abs_dir = sweep_dir.resolve()
        before = tree_of(abs_dir)
        master = copy.deepcopy(self.config)
        with read_write(master.hydra.sweep):
            master.hydra.sweep.dir = str(sweep_dir)  # resolved once (${vtw_now:...}): every task sees this directory
        plan = self._plan(master, job_overrides, abs_dir)
        problem = gpu_mismatch(self.params, partition_gres(self.params.get("partition")))
        if problem is not None:
            undo_submission(abs_dir, before)
            raise SystemExit(problem)
        sub = abs_dir / SUBMISSIONS_DIR / str(len(submissions(abs_dir)))
        submitted: list[str] = []
        try:
            self._write(sub, plan, master)
            ids = self._submit(sub, plan, submitted)
        except BaseException:
            if submitted:
                subprocess.run(["scancel", *submitted], capture_output=True)
            undo_submission(abs_dir, before)
            raise
        pending = format_indices(plan["pending"])
        line = (f"submission={sub.name} search={ids['search'] or '-'} array={ids['array'] or '-'} "
                f"points={pending or '-'} summary={ids['summary']}")  # fmt: skip
        with open(abs_dir / "submissions.log", "a") as f:
            f.write(f"{_now()} {line}\n")
        queued = f"points {pending} queued" if pending else "every point has results: only the summary runs"
        log.info("launcher=sbatch: %d points in %s, %s; %s", len(plan["points"]), sweep_dir, queued, line)
        log.info("resubmit the unfinished points: the same command with resume=true hydra.sweep.dir=%s", sweep_dir)
        print(f"VTW_SWEEP_DIR={abs_dir}\nVTW_SEARCH_JOB={ids['search']}\nVTW_ARRAY_JOB={ids['array']}\n"
              f"VTW_SUMMARY_JOB={ids['summary']}", flush=True)  # fmt: skip
        returns = []
        for pt in plan["points"]:
            ret = JobReturn(overrides=pt["overrides"], status=JobStatus.COMPLETED)
            ret.return_value = f"queued as {ids['array']}_{pt['index']}" if pt["index"] in plan["pending"] else "done"
            returns.append(ret)
        return returns


def _now() -> str:
    from vtw.pipeline.status import now_iso

    return now_iso()


# ------------------------------------------------------------------------------------------------ in the jobs
def _load(sub: Path) -> tuple[dict, dict]:
    """The plan and the launch state of a submission, with Hydra's globals set up as in the submitter."""
    plan, state = read_plan(sub), pickle.loads((sub / STATE_FILE).read_bytes())
    resolvers = Singleton.get_state()["omegaconf_resolvers"]  # OmegaConf's own; Hydra's and the app's come next
    Singleton.set_state({"instances": state["singletons"], "omegaconf_resolvers": resolvers})
    setup_globals()
    state["task_function"] = _load_task(state["task"])
    return plan, state


def run_task(sub: Path, stage: str, index: int) -> int:
    """Run point ``index`` (``stage="point"``) or layer search ``index`` (``"search"``) of a submission through
    Hydra's ``run_job``, in its fixed directory; 1 when the job failed."""
    from vtw.pipeline.status import job_state

    plan, state = _load(sub)
    jobs = {j["index"]: j for j in plan["searches" if stage == "search" else "points"]}
    if index not in jobs:
        print(f"vtw: no {stage} {index} in {sub / PLAN_FILE} ({sorted(jobs)})", file=sys.stderr)
        return 2
    job = jobs[index]
    hydra_context: HydraContext = state["hydra_context"]
    cfg = hydra_context.config_loader.load_sweep_config(state["config"], list(job["overrides"]))
    with open_dict(cfg.hydra):
        cfg.hydra.job.num = index
        cfg.hydra.job.id = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '')}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        cfg.hydra.sweep.subdir = job["dir"]
    run_job(hydra_context=hydra_context, task_function=state["task_function"], config=cfg, job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir")  # fmt: skip
    return 1 if job_state(Path(plan["sweep_dir"]) / job["dir"]) == "failed" else 0


def run_summary(sub: Path) -> int:
    """The summary job: ``status.tsv`` (every point's state), the sweep summary and its W&B run; 1 unless every
    point is finished."""
    from vtw.io import atomic_write_text
    from vtw.pipeline.callbacks import finish_sweep

    plan, state = _load(sub)
    sweep_dir = Path(plan["sweep_dir"])
    table = status_table(sweep_dir, plan)
    atomic_write_text(sweep_dir / STATUS_FILE, table)
    print(table, end="")
    finish_sweep(state["config"], sweep_dir)
    return 0 if all(s in ("ok", "skipped") for _, s, _ in point_states(sweep_dir, plan)) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 4 and args[0] == "task":
        return run_task(Path(args[1]), args[2], int(args[3]))
    if len(args) == 2 and args[0] == "summary":
        return run_summary(Path(args[1]))
    print("usage: python -m hydra_plugins.vtw_launcher.sbatch task SUBMISSION point|search INDEX | summary SUBMISSION",
          file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main())
