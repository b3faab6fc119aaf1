"""Data parallel inside one job: rank, world size, the process group, and the few collectives vtw needs.

One home for "which process am I": the ``vtw`` lmms-eval model (one replica per rank) and the pipeline (rank 0
writes, the layer search runs once) both ask :func:`world`.

* Launchers: ``torchrun`` and ``accelerate launch`` set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
  ``MASTER_ADDR`` / ``MASTER_PORT``; a SLURM job with several tasks (``srun``, submitit's
  ``tasks_per_node``) sets ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``, which :func:`export_slurm_env`
  turns into the former (submitit's ``TorchDistributedEnvironment``: master = the job's first node, a port drawn
  from the job id). lmms-eval itself reads ``RANK`` / ``WORLD_SIZE`` to split the documents.
* The process group is accelerate's (:func:`init`): NCCL on GPUs, gloo on CPU (``cpu=True`` is what makes
  accelerate build the gloo group; without it a CPU run would be treated as one process).
* Collectives are object collectives over that group; with one process they are the identity.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` (global), ``size`` (processes), ``local_rank`` (on this node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _slurm_step_tasks() -> int:
    """Tasks of the current SLURM job *step* (``srun``; submitit launches its tasks so). The batch script itself
    is one process even when the job asked ``--ntasks=N``, and it has no ``SLURM_STEP_NUM_TASKS``."""
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return 1


def export_slurm_env() -> None:
    """Inside a SLURM job step with several tasks and no ``RANK`` yet: export ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` from SLURM's variables (submitit's helper), so that torch,
    accelerate and lmms-eval see the same world. No-op elsewhere."""
    if "RANK" in os.environ or _slurm_step_tasks() <= 1 or "SLURM_PROCID" not in os.environ:
        return
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # a submitit task (launcher=slurm): submitit's own mapping
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    env = os.environ  # a plain `srun python run.py ...`: the same mapping
    env.setdefault("MASTER_ADDR", _first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 40000))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(_slurm_step_tasks()), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[3-5,9]`` → ``node3``), without calling ``scontrol``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return "127.0.0.1"
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def world() -> World:
    """The world from the environment (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, after
    :func:`export_slurm_env`); one process when none is set."""
    export_slurm_env()
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad data-parallel world: RANK={rank}, WORLD_SIZE={size} (need 0 <= RANK < WORLD_SIZE)")
    return World(rank=rank, size=size, local_rank=local)


def init(cpu: bool | None = None):
    """Join the process group (idempotent; accelerate's shared ``PartialState``), for ``WORLD_SIZE > 1``.

    Args:
        cpu: gloo on CPU; ``None``: CPU when CUDA is not available.

    Returns:
        The ``accelerate.PartialState``, or ``None`` with one process.
    """
    if world().size <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(not torch.cuda.is_available()) if cpu is None else cpu)


def _active() -> bool:
    import torch.distributed as dist

    return world().size > 1 and dist.is_available() and dist.is_initialized()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (a picklable object); ``obj`` itself with one process."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """On rank 0: ``[obj of rank 0, obj of rank 1, ...]``; ``None`` on the other ranks; ``[obj]`` with one process."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    w = world()
    out = [None] * w.size if w.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if _active():
        import torch.distributed as dist

        dist.barrier()
