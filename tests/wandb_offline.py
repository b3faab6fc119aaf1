"""Read back an offline W&B run (``<dir>/wandb/offline-run-*/run-<id>.wandb``): what was logged, without a server.

Used by the tests to check that what W&B got equals ``results.json``, and handy to inspect a run before
``wandb sync``. The ``.wandb`` file is W&B's record log (protobuf ``Record`` messages in its LevelDB-style
container); W&B's own ``DataStore`` reads the container.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OfflineRun:
    """What an offline run recorded.

    Attributes:
        run_dir: the ``offline-run-*`` directory; run_id, project, group, name, job_type: as given to ``init``.
        config: the run config (``_wandb`` internals dropped).
        summary: the final summary (last value of every key; nested keys joined with ``.``).
        tables: ``{key: {"columns": [...], "data": [[...]]}}`` of every logged ``wandb.Table``.
    """

    run_dir: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)


def find_offline_runs(root: str | Path) -> list[Path]:
    """Every ``offline-run-*`` directory under ``root`` (sorted)."""
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())


def _records(wandb_file: Path):
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    ds = DataStore()
    ds.open_for_scan(str(wandb_file))
    try:
        while True:
            data = ds.scan_data()
            if data is None:
                return
            rec = pb.Record()
            rec.ParseFromString(data)
            yield rec
    finally:
        ds.close()


def _key(item) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _finished_records(wandb_file: Path, timeout: float) -> list:
    """Every record of the run once W&B has written its last one (``exit``). ``run.finish()`` can return before W&B's
    writer has flushed the run's tail (its history, summary and exit records; seen once in a full suite run), so
    the file is read again until the exit record is there, or ``TimeoutError`` naming what was read."""
    deadline, records = time.monotonic() + timeout, []
    while True:
        try:
            records = list(_records(wandb_file))
        except Exception:  # noqa: BLE001 - a block being written reads as damaged: read again
            records = []
        if any(rec.WhichOneof("record_type") == "exit" for rec in records):
            return records
        if time.monotonic() > deadline:
            kinds = [rec.WhichOneof("record_type") for rec in records]
            raise TimeoutError(f"{wandb_file}: no exit record after {timeout:.0f} s; records: {kinds}")
        time.sleep(0.1)


def read_offline_run(run_dir: str | Path, timeout: float = 60) -> OfflineRun:
    """Parse one finished ``offline-run-*`` directory (waiting up to ``timeout`` s for W&B to write its end)."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("*.wandb"))
    if len(files) != 1:
        raise ValueError(f"{run_dir}: expected one .wandb file, found {len(files)}")
    out = OfflineRun(run_dir=run_dir)
    for rec in _finished_records(files[0], timeout):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.run_id, out.project, out.group, out.name = r.run_id, r.project, r.run_group, r.display_name
            out.job_type = r.job_type
            for item in r.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
            for item in rec.config.remove:
                out.config.pop(_key(item), None)
        elif kind == "summary":
            for item in rec.summary.update:
                out.summary[_key(item)] = json.loads(item.value_json)
            for item in rec.summary.remove:
                out.summary.pop(_key(item), None)
    out.config.pop("_wandb", None)
    # tables: summary entries "<key>._type" == "table-file" point at files/<path>
    for k, v in list(out.summary.items()):
        if k.endswith("._type") and v == "table-file":
            base = k[: -len("._type")]
            path = run_dir / "files" / out.summary.get(f"{base}.path", "")
            if path.is_file():
                out.tables[base] = json.loads(path.read_text())
    return out
