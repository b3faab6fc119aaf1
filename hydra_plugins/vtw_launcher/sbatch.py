"""``launcher=sbatch``: ``launcher=slurm`` (submitit and :mod:`.slurm`'s checks) returning once the jobs are queued.

It fixes each point's directory (``${hydra.sweep.dir}/${hydra.sweep.subdir}``, resolved once, in
``<sweep dir>/.sbatch/<n>/plan.json``) and submits with submitit: the layer search first when pending points have
``vtw.layer=auto`` (one ``mode=search`` job per distinct point, in ``.search/<i>``), the array of the points without
results (``--requeue``, ``afterok`` on the search) and a summary job (``afterany``: ``status.tsv``, the sweep summary).
A resubmission (``resume=true``, the same ``hydra.sweep.dir``) submits only the unfinished points, task k the k-th.
"""

import json
import logging
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
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
SETUP = ['echo "[vtw] $(date -Is) host=$(hostname) job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0}"',
         f"export PYTHONPATH={Path(__file__).resolve().parents[2]}${{PYTHONPATH:+:$PYTHONPATH}}"]  # fmt: skip


@dataclass
class SbatchLauncherConf(SlurmQueueConf):
    """``hydra.launcher.*`` of ``launcher=sbatch``: submitit's (``launcher=slurm``'s) plus two; vtw's defaults are in
    ``conf/launcher/sbatch.yaml``."""

    _target_: str = "hydra_plugins.vtw_launcher.sbatch.SbatchLauncher"
    array_parallelism: int | None = 256  # null: no bound
    layer_search: bool = True  # run the layer search first when points have vtw.layer=auto
    summary_timeout_min: int = 30


ConfigStore.instance().store(group="hydra/launcher", name="sbatch", node=SbatchLauncherConf, provider="vtw")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _pin(key: str, value) -> str:
    return f"hydra.sweep.{key}='" + str(value).replace("'", "\\'") + "'"  # quoted for Hydra's override parser


def submissions(sweep_dir: str | Path) -> list[Path]:
    """The submission folders of a sweep, oldest first."""
    return sorted((p for p in Path(sweep_dir).glob(".sbatch/*") if p.name.isdigit()), key=lambda p: int(p.name))


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

    def __call__(self, *args):  # in the job: hydra-submitit-launcher's run_job of one point, in its fixed directory
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # scancel / requeue stop it now (submitit would wait for USR2)
        ret = super().__call__(*args)
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
        a resubmission must be the same sweep (up to ``RESUBMIT_KEYS``) and keeps its directories."""
        from vtw.pipeline.status import job_state

        old = read_plan(sweep_dir)["points"] if submissions(sweep_dir) else None
        same = [[o for o in x if _key(o) not in RESUBMIT_KEYS] for x in job_overrides]
        if old is not None and [[o for o in p["overrides"] if _key(o) not in RESUBMIT_KEYS] for p in old] != same:
            raise SystemExit(f"vtw: hydra.sweep.dir={sweep_dir} holds a sweep of {len(old)} points, this one has "
                             f"{len(same)}{' (not the same)' * (len(old) == len(same))}; resubmit the same command "
                             "(with resume=true) or pick a new hydra.sweep.dir")  # fmt: skip
        points, searches, hydra_cfg = [], {}, HydraConfig.instance().cfg
        for i, overrides in enumerate(map(list, job_overrides)):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = i
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the subdir resolves as in run_job
            points.append({"index": i, "dir": old[i]["dir"] if old else str(cfg.hydra.sweep.subdir), "overrides": overrides})  # fmt: skip
            if str(OmegaConf.select(cfg, "vtw.layer")) == "auto" and self.params["layer_search"]:
                searches.setdefault((*(o for o in overrides if _key(o) != "mode"), "mode=search"), i)
        HydraConfig.instance().cfg = hydra_cfg
        pending = [p["index"] for p in points if job_state(sweep_dir / p["dir"]) not in ("ok", "skipped")]
        searches = [list(s) for s, i in searches.items() if i in pending]
        searches = [{"index": k, "dir": f".search/{k}", "overrides": s} for k, s in enumerate(searches)]
        return {"sweep_dir": str(sweep_dir), "points": points, "searches": searches, "pending": pending}

    def _submit(self, what: str, fn, args: list, sbatch: dict, **changes) -> str:
        """``fn(*a) for a in args`` as one SLURM job or array through submitit's executor, with the settings of
        ``launcher=slurm`` (``changes`` to them, ``sbatch`` options added); its job id."""
        import submitit

        log_file = f"{what}_".lstrip("_") + ("%A_%a.out" if len(args) > 1 else "%j.out")
        p = {**self.params, "stderr_to_stdout": True, "use_srun": False, **changes}
        p.update(name=f"{p['name']}-{what}".rstrip("-"), array_parallelism=p["array_parallelism"] or len(args),
                 setup=[*SETUP, *(p["setup"] or [])], additional_parameters={**p["additional_parameters"], **sbatch,
                 "output": str(Path(str(self.config.hydra.sweep.dir)).resolve() / "logs" / log_file)})  # fmt: skip
        ex = submitit.AutoExecutor(p.pop("submitit_folder"), "slurm", slurm_max_num_timeout=p.pop("max_num_timeout"))
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
        plan, state = self._plan(job_overrides, sweep_dir), Singleton.get_state()
        (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory

        def jobs(items) -> list[tuple]:  # hydra-submitit-launcher's job arguments, with the directories pinned
            return [([*j["overrides"], _pin("dir", sweep_dir), _pin("subdir", j["dir"])], "hydra.sweep.dir", j["index"],
                     "", state) for j in items]  # fmt: skip

        ids, requeue = {"search": "", "array": ""}, {"requeue": True, "kill-on-invalid-dep": "yes"}
        try:
            if plan["searches"]:
                ids["search"] = self._submit("search", self, jobs(plan["searches"]), requeue)
            if plan["pending"]:
                after = {"dependency": f"afterok:{ids['search']}"} if ids["search"] else {}
                todo = jobs(plan["points"][i] for i in plan["pending"])
                ids["array"] = self._submit("", self, todo, requeue, **after)
            after = {"dependency": f"afterany:{ids['array']}"} if ids["array"] else {}
            ids["summary"] = self._submit("summary", self.summarize, [(plan, state)], {"kill-on-invalid-dep": "no"},
                                          cpus_per_task=1, gpus_per_node=None, mem_gb=None,
                                          timeout_min=self.params["summary_timeout_min"], **after)  # fmt: skip
        except BaseException:
            if any(ids.values()):
                subprocess.run(["scancel", *filter(None, ids.values())], capture_output=True)
            raise
        sub = sweep_dir / ".sbatch" / str(len(submissions(sweep_dir)))
        atomic_write_json(sub / "plan.json", plan, indent=1)
        line = (f"submission={sub.name} search={ids['search'] or '-'} array={ids['array'] or '-'} "
                f"points={','.join(map(str, plan['pending'])) or '-'} summary={ids['summary']}")  # fmt: skip
        with open(sweep_dir / "submissions.log", "a") as f:
            f.write(f"{now_iso()} {line}\n")
        log.info("launcher=sbatch: %s; resubmit: the same command with resume=true", line)
        print(f"VTW_SWEEP_DIR={sweep_dir}", *(f"VTW_{k.upper()}_JOB={v}" for k, v in ids.items()), sep="\n", flush=True)
        return [JobReturn(overrides=p["overrides"], status=JobStatus.COMPLETED, _return_value="queued")
                for p in plan["points"]]  # fmt: skip
