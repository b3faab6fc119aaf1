"""What ``launcher=slurm`` and ``launcher=sbatch`` check before and around a submission: GPUs asked on a partition
without any (from ``sinfo``), sbatch's refusal as one line, and undoing what a failed launch wrote."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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


def tree_of(root: Path) -> set[Path]:
    """Every path under ``root`` (none when it is not a directory)."""
    return set(root.rglob("*")) if root.is_dir() else set()


def undo_submission(sweep_dir: Path, before: set[Path]) -> None:
    """Remove what a failed launch wrote under ``sweep_dir`` (paths not in ``before``), then the sweep directory if
    Hydra's ``multirun.yaml`` is all that is left in it."""
    for path in sorted(tree_of(sweep_dir) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
