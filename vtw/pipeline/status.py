"""``job.json``: the status of one job, written atomically when it starts and when it ends.

Fields: ``status`` (``running`` | ``ok`` | ``failed`` | ``skipped``), ``name``, ``output_dir``, ``overrides``,
``job_num``, ``host``, ``pid``, ``slurm_job_id`` (when under SLURM), ``started``, ``finished``, ``duration_s``,
``config_hash``, ``error`` / ``error_type`` / ``traceback`` (failed), ``resumed_from`` (skipped), ``wandb`` (how W&B
logging went). A job whose ``job.json`` still says ``running`` and has no live process was killed (e.g. SLURM
time limit): summaries report it as ``running``.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from ..io import atomic_write_json, read_json

JOB_FILE = "job.json"
STATUSES = ("running", "ok", "failed", "skipped")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobStatus:
    """Writer of one job's ``job.json``; every call rewrites the whole file atomically."""

    def __init__(self, output_dir: str | os.PathLike, *, name: str = "", overrides=(), job_num: int | None = None):
        self.path = Path(output_dir) / JOB_FILE
        self._t0 = time.perf_counter()
        self.data: dict = {
            "status": "running",
            "name": name,
            "output_dir": str(Path(output_dir).resolve()),
            "overrides": list(overrides),
            "job_num": job_num,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "started": now_iso(),
        }

    def start(self, **extra) -> None:
        self.data.update(extra, status="running")
        self._write()

    def update(self, **extra) -> None:
        self.data.update(extra)
        self._write()

    def finish(self, status: str, **extra) -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"final job status must be one of {STATUSES[1:]}, got {status!r}")
        self.data.update(extra, status=status, finished=now_iso(), duration_s=round(time.perf_counter() - self._t0, 3))
        self._write()

    def fail(self, exc: BaseException, tb: str = "") -> None:
        self.finish("failed", error=str(exc) or type(exc).__name__, error_type=type(exc).__name__, traceback=tb)

    def _write(self) -> None:
        atomic_write_json(self.path, self.data)


def read_job(job_dir: str | os.PathLike) -> dict | None:
    """The ``job.json`` of a job directory, or ``None`` when it has none (or it is unreadable)."""
    path = Path(job_dir) / JOB_FILE
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None
