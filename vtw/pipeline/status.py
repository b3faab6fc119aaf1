"""Job state: ``job.json`` (written by :class:`JobStatus`), the one function that says what state a job directory is
in (:func:`read_job_dir`), and the index of finished jobs by config hash under a root (:func:`job_index`).

``job.json`` fields: ``status`` (``running`` | ``ok`` | ``failed`` | ``skipped``), ``name``, ``output_dir``,
``overrides``, ``job_num``, ``host``, ``pid``, ``slurm_job_id`` (when under SLURM), ``started``, ``finished``,
``duration_s``, ``config_hash``, ``mode``, ``error`` / ``error_type`` / ``traceback`` (failed), ``resumed_from``
(skipped), ``wandb`` (how W&B logging went).

A job directory's state (:data:`JOB_STATES`), from ``job.json`` and ``results.json`` together:

* ``ok`` / ``skipped``: finished (``skipped``: resumed, the results of an identical finished job copied in). An
  ``eval`` job counts as finished only with a valid ``results.json`` (this schema); ``mode=flops`` / ``mode=search``
  jobs write none. A directory with a valid ``results.json`` and no ``job.json`` is ``ok``.
* ``failed``: ``job.json`` says so (its ``error`` says why).
* ``running``: started and not finished: still running, or killed (SLURM time limit, ``scancel``, a dead node), or
  ``job.json`` says finished but the results are gone or unreadable.
* ``missing``: neither file (never started).

Resume (:func:`vtw.pipeline.job.find_finished`), the ``launcher=sbatch`` list of points still to run and the sweep
summaries all ask :func:`read_job_dir`; :func:`find_job_dirs` is the one walk that lists job directories.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..io import atomic_write_json, read_json
from .results import RESULTS_FILE, SCHEMA

JOB_FILE = "job.json"
STATUSES = ("running", "ok", "failed", "skipped")
JOB_STATES = ("ok", "skipped", "failed", "running", "missing")
DONE = ("ok", "skipped")
#: directories a walk for job directories never enters (a job's own W&B, lmms-eval and Hydra files)
SKIP_DIRS = frozenset({"wandb", "lmms_eval", ".hydra", "__pycache__"})


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobStatus:
    """Writer of one job's ``job.json``; every call rewrites the whole file atomically."""

    def __init__(
        self, output_dir: str | os.PathLike, *, name: str = "", overrides=(), job_num: int | None = None, rank: int = 0
    ):
        # data parallel: rank 0 writes job.json (the job's state); rank r > 0 its own job.rank<r>.json
        self.path = Path(output_dir) / (JOB_FILE if rank == 0 else f"job.rank{rank}.json")
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


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class JobDir:
    """One job directory as read once: its :data:`JOB_STATES` state, ``job.json`` (``{}`` when absent or
    unreadable) and ``results.json`` (``None`` unless a valid results file of this schema)."""

    path: Path
    state: str
    job: dict = field(default_factory=dict)
    results: dict | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE

    @property
    def config_hash(self) -> str | None:
        return self.results.get("config_hash") if self.results else None


def _read(path: Path) -> dict | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_job_dir(job_dir: str | os.PathLike) -> JobDir:
    """The state of ``job_dir`` (see the module docstring) with its files."""
    d = Path(job_dir)
    res = _read(d / RESULTS_FILE)
    if res is not None and not (res.get("schema") == SCHEMA and res.get("status") == "ok"):
        res = None
    if not (d / JOB_FILE).is_file():
        return JobDir(d, "ok" if res is not None else "missing", {}, res)
    job = _read(d / JOB_FILE)
    if job is None:
        return JobDir(d, "running", {}, res)
    status = job.get("status")
    if status in DONE:
        needs_results = job.get("mode") in (None, "eval")
        return JobDir(d, status if res is not None or not needs_results else "running", job, res)
    return JobDir(d, "failed" if status == "failed" else "running", job, res)


def job_state(job_dir: str | os.PathLike) -> str:
    """``ok`` | ``skipped`` | ``failed`` | ``running`` | ``missing`` (see the module docstring)."""
    return read_job_dir(job_dir).state


def find_job_dirs(root: str | os.PathLike, *, max_depth: int | None = None) -> list[Path]:
    """Directories under ``root`` (itself included) that hold ``job.json`` or ``results.json``, in walk order.

    A job directory is not entered further; hidden directories (``.submitit``, ``.cache``, ``.search``) and
    :data:`SKIP_DIRS` are not entered; ``max_depth`` bounds the depth below ``root`` (``None``: no bound).
    """
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / JOB_FILE).is_file() or (d / RESULTS_FILE).is_file():
            found.append(d)
            return
        if max_depth is not None and depth >= max_depth:
            return
        try:
            subs = sorted(p for p in d.iterdir() if p.is_dir())
        except OSError:
            return
        for sub in subs:
            if sub.name not in SKIP_DIRS and not sub.name.startswith("."):
                walk(sub, depth + 1)

    root = Path(root)
    if root.is_dir():
        walk(root, 0)
    return found


class JobIndex:
    """The finished job directories under a root by config hash, from one walk (:func:`job_index`)."""

    def __init__(self, root: Path, jobs: list[JobDir]):
        self.root = root
        self.by_hash: dict[str, Path] = {}
        for j in jobs:
            if j.done and j.config_hash:
                self.by_hash.setdefault(j.config_hash, j.path)

    def find(self, config_hash: str) -> Path | None:
        return self.by_hash.get(config_hash)

    def add(self, config_hash: str, job_dir: Path) -> None:
        """Record a job this process has just finished (so that a later job of the same process finds it)."""
        self.by_hash.setdefault(config_hash, Path(job_dir))


_INDEXES: dict[Path, JobIndex] = {}


def job_index(root: str | os.PathLike, *, fresh: bool = False) -> JobIndex:
    """The :class:`JobIndex` of ``root``, built by one walk the first time it is asked for in this process (a local
    sweep's jobs share it) and kept up to date with the jobs this process finishes (:func:`record_finished`);
    ``fresh=True`` walks again."""
    key = Path(root).resolve()
    if fresh or key not in _INDEXES:
        _INDEXES[key] = JobIndex(key, [read_job_dir(d) for d in find_job_dirs(key)])
    return _INDEXES[key]


def record_finished(config_hash: str, job_dir: str | os.PathLike) -> None:
    """Add a job just finished in this process to every index already built whose root holds it."""
    d = Path(job_dir).resolve()
    for root, index in _INDEXES.items():
        if d == root or root in d.parents:
            index.add(config_hash, d)
