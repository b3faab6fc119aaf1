"""``launcher=sbatch``: ``launcher=slurm`` (submitit, with :mod:`.slurm`'s checks) that returns once the jobs are queued.

Hydra's sweeper expands the overrides; :class:`SbatchLauncher` fixes each point's job directory (Hydra's
``${hydra.sweep.dir}/${hydra.sweep.subdir}``, resolved once and recorded in ``<sweep dir>/.sbatch/<n>/plan.json``),
then submits through submitit's executor (its pickles, scripts and runner under ``hydra.launcher.submitit_folder``):
when pending points have ``vtw.layer=auto``, one ``mode=search`` job per distinct point (in ``.search/<i>``) first;
the array of the points without results (``--requeue``, ``--dependency=afterok`` on the search), each task running its
point like ``launcher=slurm`` does; a summary job after it (``afterany``) that writes ``status.tsv`` and the sweep
summary. Logs: ``<sweep dir>/logs/``. It does not wait (``conf/launcher/sbatch.yaml`` leaves the summary to that job).
Resubmission: the same command with ``resume=true`` and the same ``hydra.sweep.dir``: only the points whose
directory is not finished (:func:`vtw.pipeline.status.job_state`) are submitted, array task ``k`` running the
``k``-th of them.
"""

import json
import logging
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from omegaconf import OmegaConf, open_dict

from .slurm import CheckedSlurmLauncher

log = logging.getLogger("vtw")
RESUBMIT_KEYS = ("resume", "resume_root")  # overrides that may change between submissions of one sweep
STARTED = 'echo "[vtw] $(date -Is) host=$(hostname) job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0}"'


@dataclass
class SbatchLauncherConf(SlurmQueueConf):
    """``hydra.launcher.*`` of ``launcher=sbatch``: ``launcher=slurm``'s (submitit's) with vtw's defaults, plus two."""

    _target_: str = "hydra_plugins.vtw_launcher.sbatch.SbatchLauncher"
    gpus_per_node: int | None = 1  # null (or 0) for CPU-only partitions
    cpus_per_task: int | None = 8
    mem_gb: int | None = 32
    timeout_min: int = 240
    array_parallelism: int | None = 16  # null: no bound
    name: str = "vtw-${hydra.job.name}"  # the search and summary jobs add -search / -summary
    setup: list[str] = field(default_factory=list)  # shell lines run in every job before python starts
    layer_search: bool = True  # run the layer search first when points have vtw.layer=auto
    summary_timeout_min: int = 30


ConfigStore.instance().store(group="hydra/launcher", name="sbatch", node=SbatchLauncherConf, provider="vtw")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _pin(key: str, value: str | Path) -> str:
    """The override that fixes ``hydra.sweep.KEY`` of a job to ``value`` (quoted for Hydra's override parser)."""
    return f"hydra.sweep.{key}='" + str(value).replace("'", "\\'") + "'"


def _same_point(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if _key(o) not in RESUBMIT_KEYS]


def submissions(sweep_dir: str | Path) -> list[Path]:
    """The submission folders of a sweep, oldest first."""
    root = Path(sweep_dir) / ".sbatch"
    return sorted((p for p in root.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))


def read_plan(sweep_dir: str | Path) -> dict:
    """``plan.json`` of the latest submission of a sweep directory."""
    if not submissions(sweep_dir):
        raise ValueError(f"{str(sweep_dir)!r} holds no sweep submitted with launcher=sbatch")
    return json.loads((submissions(sweep_dir)[-1] / "plan.json").read_text())


def point_states(sweep_dir: str | Path, plan: dict) -> list[tuple[int, str, str]]:
    """``(index, state, dir)`` of every point (:func:`vtw.pipeline.status.job_state`)."""
    from vtw.pipeline.status import job_state

    return [(p["index"], job_state(Path(sweep_dir) / p["dir"]), p["dir"]) for p in plan["points"]]


class SbatchLauncher(CheckedSlurmLauncher):
    """See the module docstring."""

    waits = False

    def __call__(self, *args):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # scancel / requeue stop it now (submitit would wait for USR2)
        ret = super().__call__(*args)  # in the job: hydra-submitit-launcher's run_job of one point
        if ret.return_value == "failed":  # a job that raised raises here: the task fails, afterok holds the array
            raise RuntimeError(f"vtw: the job in {ret.working_dir} failed (see its job.json)")
        return ret

    def summarize(self, plan: dict, singletons: dict) -> None:
        """The summary job: ``status.tsv``, the sweep summary and its W&B run; fails unless every point finished."""
        from vtw.io import atomic_write_text
        from vtw.pipeline.callbacks import finish_sweep

        Singleton.set_state(singletons)
        setup_globals()
        sweep_dir, states = Path(plan["sweep_dir"]), point_states(plan["sweep_dir"], plan)
        table = "".join(f"{i}\t{s}\t{d}\n" for i, s, d in [("index", "status", "dir"), *states])
        atomic_write_text(sweep_dir / "status.tsv", table)
        print(table, end="", flush=True)
        finish_sweep(self.config, sweep_dir)
        if any(s not in ("ok", "skipped") for _, s, _ in states):
            raise RuntimeError(f"vtw: not every point of {sweep_dir} finished (status.tsv)")

    def _plan(self, job_overrides: Sequence[Sequence[str]], sweep_dir: Path) -> dict:
        """The points (index, fixed directory, overrides), the layer searches and the indices of the pending points;
        a resubmission keeps the directories of the previous submission and must be the same sweep."""
        from vtw.pipeline.status import job_state

        old = read_plan(sweep_dir)["points"] if submissions(sweep_dir) else None
        redo = f"resubmit the same command (with resume=true) or pick a new hydra.sweep.dir={sweep_dir}"
        if old is not None and len(old) != len(job_overrides):
            raise SystemExit(f"vtw: hydra.sweep.dir={sweep_dir} holds a sweep of {len(old)} points, this one has "
                             f"{len(job_overrides)}; {redo}")  # fmt: skip
        points, searches, hydra_cfg = [], {}, HydraConfig.instance().cfg
        for i, overrides in enumerate(map(list, job_overrides)):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            if old and _same_point(old[i]["overrides"]) != _same_point(overrides):
                raise SystemExit(f"vtw: hydra.sweep.dir={sweep_dir} holds another sweep: its point {i} is "
                                 f"{' '.join(old[i]['overrides'])!r}, now {' '.join(overrides)!r}; {redo}")  # fmt: skip
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = i
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the subdir resolves as run_job would
            points.append(
                {"index": i, "dir": old[i]["dir"] if old else str(cfg.hydra.sweep.subdir), "overrides": overrides}
            )
            if str(OmegaConf.select(cfg, "vtw.layer")) == "auto" and self.params.get("layer_search", True):
                searches.setdefault((*(o for o in overrides if _key(o) != "mode"), "mode=search"), i)
        HydraConfig.instance().cfg = hydra_cfg
        pending = [p["index"] for p in points if job_state(sweep_dir / p["dir"]) not in ("ok", "skipped")]
        searches = [list(s) for s, i in searches.items() if i in pending]
        searches = [{"index": k, "dir": f".search/{k}", "overrides": s} for k, s in enumerate(searches)]
        return {"sweep_dir": str(sweep_dir), "points": points, "searches": searches, "pending": pending}

    def _submit(self, what: str, fn, args: list, logs: Path, **changes) -> str:
        """``fn(*args[0])``, ... as one SLURM job or array through submitit's executor; its job id."""
        import submitit

        p = {**self.params, **changes, "stderr_to_stdout": True, "use_srun": False}
        p["name"] = f"{p['name']}{what and '-' + what}"
        p["array_parallelism"] = p.get("array_parallelism") or len(args)
        log_name = f"{what}_" * (what != "") + ("%A_%a.out" if len(args) > 1 else "%j.out")
        p["additional_parameters"] = {**p["additional_parameters"], "output": str(logs / log_name), **p.pop("sbatch")}
        p["setup"] = [STARTED, f"export PYTHONPATH={Path(__file__).resolve().parents[2]}:$PYTHONPATH", *p["setup"]]
        ex = submitit.AutoExecutor(folder=p.pop("submitit_folder"), cluster="slurm",
                                   slurm_max_num_timeout=p.pop("max_num_timeout"))  # fmt: skip
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in p.items()
                                if v is not None and k not in ("layer_search", "summary_timeout_min")})  # fmt: skip
        jobs = ex.map_array(fn, *zip(*args)) if len(args) > 1 else [ex.submit(fn, *args[0])]
        return jobs[0].job_id.split("_")[0]

    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from vtw.io import atomic_write_json
        from vtw.pipeline.status import now_iso

        if initial_job_idx != 0:
            raise SystemExit("vtw: launcher=sbatch submits a sweep as one array; unset hydra.sweeper.max_batch_size")
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        plan, logs, singletons = self._plan(job_overrides, sweep_dir), sweep_dir / "logs", Singleton.get_state()
        sub = sweep_dir / ".sbatch" / str(len(submissions(sweep_dir)))
        logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
        ids, requeue = {"search": "", "array": ""}, {"requeue": True, "kill-on-invalid-dep": "yes"}

        def jobs(items: list[dict]) -> list[tuple]:  # the arguments of each job: hydra-submitit-launcher's, pinned
            return [([*j["overrides"], _pin("dir", sweep_dir), _pin("subdir", j["dir"])], "hydra.sweep.dir", j["index"],
                     "", singletons) for j in items]  # fmt: skip

        try:
            if plan["searches"]:
                ids["search"] = self._submit("search", self, jobs(plan["searches"]), logs, sbatch=requeue)
            if plan["pending"]:
                after = {"dependency": f"afterok:{ids['search']}"} if ids["search"] else {}
                pending = [plan["points"][i] for i in plan["pending"]]
                ids["array"] = self._submit("", self, jobs(pending), logs, sbatch=requeue, **after)
            after = {"dependency": f"afterany:{ids['array']}"} if ids["array"] else {}
            ids["summary"] = self._submit("summary", self.summarize, [(plan, singletons)], logs, cpus_per_task=1,
                                          gpus_per_node=None, mem_gb=None, timeout_min=self.params["summary_timeout_min"],
                                          sbatch={"kill-on-invalid-dep": "no"}, **after)  # fmt: skip
        except BaseException:
            if any(ids.values()):
                subprocess.run(["scancel", *filter(None, ids.values())], capture_output=True)
            raise
        atomic_write_json(sub / "plan.json", plan, indent=1)
        line = " ".join(f"{k}={v or '-'}" for k, v in [("submission", sub.name), *ids.items()][:3]) + (
            f" points={','.join(map(str, plan['pending'])) or '-'} summary={ids['summary']}"
        )
        with open(sweep_dir / "submissions.log", "a") as f:
            f.write(f"{now_iso()} {line}\n")
        log.info("launcher=sbatch: %d points in %s: %s; resubmit the unfinished ones with the same command and "
                 "resume=true hydra.sweep.dir=%s", len(plan["points"]), sweep_dir, line, sweep_dir)  # fmt: skip
        print("".join(f"VTW_{k}={v}\n" for k, v in [("SWEEP_DIR", sweep_dir), *((f"{k.upper()}_JOB", v)
                      for k, v in ids.items())]), end="", flush=True)  # fmt: skip
        done = [JobReturn(overrides=p["overrides"], status=JobStatus.COMPLETED) for p in plan["points"]]
        for ret, p in zip(done, plan["points"]):
            ret.return_value = "queued" if p["index"] in plan["pending"] else "done"
        return done
