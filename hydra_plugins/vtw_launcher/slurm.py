"""``launcher=slurm``: hydra-submitit-launcher's ``submitit_slurm`` with readable submission failures.

``conf/launcher/slurm.yaml`` points ``hydra.launcher._target_`` here (Hydra instantiates launchers only from its
``hydra_plugins`` namespace package, hence this package); every setting and the whole run-time flow
(one array, blocking submitter, requeue) stay submitit's. What this adds, before and around the submission only:

* **A GPU check before anything is submitted.** The default asks one GPU per task (``gpus_per_node: 1``, right for
  users); on a CPU-only partition sbatch refuses that with ``Invalid generic resource (gres) specification`` and
  submitit raises it as a traceback. When ``sinfo`` shows that no node of the partition has any generic resource,
  the launcher stops with one line naming the setting to change (``hydra.launcher.gpus_per_node=null``).
* **sbatch's own refusal as one line** (any other bad option, or when ``sinfo`` could not tell): the first line of
  sbatch's error, with the same hint when it is about GRES.
* **A consistent sweep directory**: when nothing was submitted, the files this launch wrote (submitit's pickles and
  submission script under ``.submitit/``) are removed, and so is the sweep directory itself when only Hydra's
  ``multirun.yaml`` is left in it; results of an earlier sweep in the same directory are never touched.

The failure is raised as ``SystemExit`` (message on stderr, exit status 1), like the sweep summary's failure exit.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger("vtw")

GPU_HINT = (
    "for a CPU-only partition add hydra.launcher.gpus_per_node=null "
    "(or pick a partition with GPUs: hydra.launcher.partition=NAME)"
)


def partition_gres(partition: str | None, sinfo: str = "sinfo") -> dict[str, list[str]] | None:
    """``{partition: [gres of each node group]}`` for ``partition`` (a comma-separated list, or ``None`` for the
    cluster's default partition), from ``sinfo -h -o "%P|%G"``; ``None`` when sinfo does not answer or lists none.
    A node group without generic resources reads ``(null)``."""
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    rows: dict[str, list[str]] = {}
    default = None
    for line in out.stdout.splitlines():
        name, sep, gres = line.strip().partition("|")
        if not sep:
            continue
        if name.endswith("*"):
            name = default = name[:-1]
        rows.setdefault(name, []).append(gres.strip())
    wanted = [p.strip() for p in partition.split(",")] if partition else ([default] if default else [])
    found = {p: rows[p] for p in wanted if p in rows}
    return found or None


def requested_gpus(params: dict) -> str | None:
    """The launcher setting that asks for GPUs, as ``key=value`` (``None`` when the job asks for none)."""
    for key in ("gpus_per_node", "gpus_per_task"):
        if params.get(key):
            return f"hydra.launcher.{key}={params[key]}"
    extra = params.get("additional_parameters") or {}
    for key in ("gres", "gpus", "gpus_per_node", "gpus-per-node"):
        if extra.get(key):
            return f"hydra.launcher.additional_parameters.{key}={extra[key]}"
    return None


def gpu_mismatch(params: dict, gres: dict[str, list[str]] | None) -> str | None:
    """The one-line error when the job asks for GPUs and no node of its partition has any; else ``None``."""
    asked = requested_gpus(params)
    if asked is None or gres is None:
        return None
    if any(g and g != "(null)" for groups in gres.values() for g in groups):
        return None
    names = ", ".join(repr(p) for p in gres)
    return (
        f"vtw: SLURM partition {names} has no GPUs (sinfo lists no generic resources there) but {asked} asks for "
        f"them; {GPU_HINT}. Nothing was submitted."
    )


def sbatch_refusal(message: str) -> str:
    """One line for sbatch's error text (submitit's ``FailedJobError`` message)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "sbatch failed")
    hint = f"; {GPU_HINT}" if "gres" in first.lower() or "generic resource" in first.lower() else ""
    return f"vtw: sbatch refused the sweep: {first}{hint}. Nothing was submitted."


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.is_dir() else set()


def undo_submission(sweep_dir: Path, before: set[Path]) -> None:
    """Remove what a failed launch wrote under ``sweep_dir`` (paths not in ``before``), then the sweep directory if
    Hydra's ``multirun.yaml`` is all that is left in it."""
    for path in sorted(_tree(sweep_dir) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)


class CheckedSlurmLauncher(SlurmLauncher):
    """submitit's SLURM launcher that fails before submitting, in one line, where sbatch would refuse (see module)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from submitit.core.utils import FailedJobError

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        before = _tree(sweep_dir)
        problem = gpu_mismatch(self.params, partition_gres(self.params.get("partition")))
        if problem is None:
            try:
                return super().launch(job_overrides, initial_job_idx)
            except FailedJobError as e:
                if "sbatch" not in str(e):  # not a refused submission (a job's own failure): submitit's error
                    raise
                problem = sbatch_refusal(str(e))
        undo_submission(sweep_dir, before)
        raise SystemExit(problem)
