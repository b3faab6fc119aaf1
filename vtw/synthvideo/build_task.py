"""Write the lmms-eval tasks of the synthetic video benchmark (``python -m vtw.synthvideo.build_task``).

Writes into `vtw/assets/tasks/vtw_synthvideo/` (next to its hand-written `utils.py`):

- `videos/<id>.mp4`: the clip of each of the first `TEST_ITEMS` test items (:meth:`ClipItem.mp4_bytes`).
- `test.parquet`: one row per item (`id`, `kind`, `question`, `prompt`, `answer`, `choices` joined by `|`, `seed`,
  `video`: the clip's file name under `videos/`), read offline by lmms-eval.
- `vtw_synthvideo.yaml`: short answer (`generate_until`, one word), lmms-eval's `exact_match`.
- `vtw_synthvideo_mc.yaml`: multiple choice (the likelihood of each of the kind's four answers), lmms-eval's `acc`.

Every file is written atomically; clips of items no longer in the split are removed. Regenerating gives identical
bytes (seeded generator; FFmpeg's MPEG-4 encoder, one thread).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vtw.io import atomic_write_bytes
from vtw.synthvideo.generator import iter_items
from vtw.synthvqa.build_task import DATA_FILE, MULTIPLE_CHOICE, SHORT_ANSWER, render_task_yaml

TASK_DIR = Path(__file__).resolve().parent.parent / "assets" / "tasks" / "vtw_synthvideo"
TEST_ITEMS = 300
VIDEO_DIR = "videos"
TASKS: tuple[str, ...] = ("vtw_synthvideo", "vtw_synthvideo_mc")

_BODIES = {
    "vtw_synthvideo": (
        "Synthetic video QA (motion direction, order of appearance, flash count): one-word answers, exact match.",
        SHORT_ANSWER,
    ),
    "vtw_synthvideo_mc": (
        "Synthetic video QA: multiple choice among the kind's four answers, by likelihood.",
        MULTIPLE_CHOICE,
    ),
}


def task_yaml(task: str, items: int) -> str:
    """The YAML text of `task` (one of `TASKS`)."""
    return render_task_yaml(_BODIES, task, items, script="vtw.synthvideo.build_task", metadata="chance: 0.25")


def write_task(task_dir: Path = TASK_DIR, count: int = TEST_ITEMS) -> list[Path]:
    """Write the clips, the data file and both task YAMLs into `task_dir`; returns the paths written."""
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    task_dir = Path(task_dir)
    columns: dict[str, list] = {k: [] for k in ("id", "kind", "question", "prompt", "answer", "choices", "video")}
    columns["seed"] = []
    written = []
    for item in iter_items("test", count):
        name = f"{item.item_id}.mp4"
        written.append(atomic_write_bytes(task_dir / VIDEO_DIR / name, item.mp4_bytes()))
        for key, value in (("id", item.item_id), ("kind", item.kind), ("question", item.question),
                           ("prompt", item.prompt), ("answer", item.answer), ("choices", "|".join(item.choices)),
                           ("video", name), ("seed", item.seed)):  # fmt: skip
            columns[key].append(value)
    keep = {p.name for p in written}
    for stale in (task_dir / VIDEO_DIR).glob("*.mp4"):
        if stale.name not in keep:
            stale.unlink()
    schema = pa.schema([pa.field(k, pa.int64() if k == "seed" else pa.string()) for k in columns])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), buffer, compression="zstd")
    written.append(atomic_write_bytes(task_dir / DATA_FILE, buffer.getvalue()))
    for task in TASKS:
        written.append(atomic_write_bytes(task_dir / f"{task}.yaml", task_yaml(task, count).encode()))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vtw.synthvideo.build_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=TASK_DIR)
    parser.add_argument("--items", type=int, default=TEST_ITEMS)
    args = parser.parse_args(argv)
    paths = write_task(args.output, args.items)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files into {args.output} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
