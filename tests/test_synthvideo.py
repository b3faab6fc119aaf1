"""The synthetic video benchmark: determinism, every shipped answer recomputed from the pixels of its clip as the
``vtw`` model reads it (``InputBuilder.load_videos``), the shipped task files, lmms-eval indexing them offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vtw.synthvideo import build_task
from vtw.synthvideo.generator import (
    ANSWER_SETS,
    BACKGROUND,
    CANVAS,
    FRAMES,
    KINDS,
    SPLIT_SEEDS,
    chance_accuracy,
    iter_items,
    make_item,
)
from vtw.synthvqa.generator import COLORS, SHORT_SUFFIX

TASKS = Path(__file__).resolve().parent.parent / "vtw" / "assets" / "tasks"
TASK_DIR = TASKS / "vtw_synthvideo"


@pytest.fixture(scope="module")
def reader(tiny_llava_dir):
    """The loader of the ``vtw`` lmms-eval model (its ``max_frames_num`` is set per test)."""
    from transformers import AutoProcessor

    from vtw.families import family
    from vtw.lmms.inputs import InputBuilder

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    return InputBuilder(proc, family("llava"), device=torch.device("cpu"), dtype=torch.float32)


def _masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per colour name, ``(F, H, W)`` bool: the pixels nearest to that colour among the palette and the background."""
    palette = np.array([BACKGROUND, *COLORS.values()])
    nearest = np.abs(frames[..., None, :].astype(int) - palette).sum(-1).argmin(-1)
    return {c: nearest == i + 1 for i, c in enumerate(COLORS)}


def _answer_from_pixels(item, frames: np.ndarray) -> str:
    """The answer recomputed from decoded frames ``(F, H, W, 3)``, knowing only the objects' colours and shapes."""
    shape_of = {o.color: o.shape for objs in item.frames for o in objs}
    masks = {c: m for c, m in _masks(frames).items() if c in shape_of}
    counts = {c: m.sum((1, 2)) for c, m in masks.items()}
    if item.kind == "direction":
        moves = {}
        for c, m in masks.items():
            moves[c] = np.argwhere(m[-1]).mean(0) - np.argwhere(m[0]).mean(0)  # centroid's (dy, dx)
        color = max(moves, key=lambda c: np.abs(moves[c]).max())
        dy, dx = moves[color]
        assert shape_of[color] in item.question
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if item.kind == "order":
        first_frame = {c: int(np.argmax(n > 40)) for c, n in counts.items()}
        return shape_of[min(first_frame, key=first_frame.get)]
    color = item.question.split(" the ")[1].split()[0]
    on = counts[color] > 40  # the square covers 100 px; edges of other shapes a few
    return str(int(on[0]) + int((on[1:] & ~on[:-1]).sum()))


def test_same_seed_same_clip_and_bytes_and_disjoint_splits():
    a, b = make_item("test", 5), make_item("test", 5)
    assert a == b and a.mp4_bytes() == b.mp4_bytes()
    assert make_item("test", 6).mp4_bytes() != a.mp4_bytes()
    assert SPLIT_SEEDS["test"] - SPLIT_SEEDS["train"] >= 10**9
    assert a.render().shape == (FRAMES, CANVAS, CANVAS, 3)


def test_every_shipped_answer_follows_from_the_decoded_pixels(reader):
    table = pq.read_table(TASK_DIR / build_task.DATA_FILE).to_pylist()
    assert len(table) == build_task.TEST_ITEMS
    items = list(iter_items("test", len(table)))
    reader.max_frames_num = 8
    paths = [str(TASK_DIR / build_task.VIDEO_DIR / row["video"]) for row in table]
    clips = reader.load_videos(paths)
    for row, item, frames in zip(table, items, clips):
        assert frames.shape == (FRAMES, CANVAS, CANVAS, 3)
        assert row["answer"] == item.answer == _answer_from_pixels(item, np.asarray(frames)), row["id"]
        assert _answer_from_pixels(item, item.render()) == item.answer, row["id"]  # the generator's own frames
        assert row["prompt"] == f"{item.question}\n{SHORT_SUFFIX}"
        assert sorted(row["choices"].split("|")) == sorted(ANSWER_SETS[item.kind])


def test_answers_are_balanced_so_chance_is_a_quarter():
    items = list(iter_items("test", build_task.TEST_ITEMS))
    assert chance_accuracy() == 0.25
    for kind in KINDS:
        answers = [it.answer for it in items if it.kind == kind]
        assert len(answers) == build_task.TEST_ITEMS // len(KINDS)
        shares = [answers.count(a) / len(answers) for a in ANSWER_SETS[kind]]
        assert max(shares) < 0.36 and min(shares) > 0.14, (kind, shares)  # a blind majority guess stays near 0.25


def test_max_frames_num_is_what_the_loader_samples(reader):
    path = str(TASK_DIR / build_task.VIDEO_DIR / "test-000000.mp4")
    full = np.asarray(make_item("test", 0).render())
    for n in (8, 4, 2):
        reader.max_frames_num = n
        (frames,) = reader.load_videos([path])
        assert frames.shape[0] == n
        picked = np.linspace(0, FRAMES, n, endpoint=False).astype(int)  # uniform sampling
        assert np.abs(frames.astype(int) - full[picked]).mean() < 3  # lossy MPEG-4, small error


def test_shipped_files_are_the_generators_output(tmp_path):
    build_task.write_task(tmp_path, build_task.TEST_ITEMS)
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (TASK_DIR / path.relative_to(tmp_path)).read_bytes(), path.name
    shipped = {p.relative_to(TASK_DIR) for p in TASK_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped - {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()} == {Path("utils.py")}
    assert sum(p.stat().st_size for p in TASK_DIR.rglob("*.mp4")) < 2_000_000  # 1.5 MB


def test_lmms_eval_indexes_the_tasks_offline():
    from lmms_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(TASKS), include_defaults=False, verbosity="ERROR")
    tasks = get_task_dict(list(build_task.TASKS), tm)
    gen, mc = (tasks[t] for t in build_task.TASKS)
    docs = list(gen.test_docs())
    assert len(docs) == build_task.TEST_ITEMS
    (path,) = gen.doc_to_visual(docs[0])
    assert Path(path).is_file() and path.endswith(docs[0]["video"])
    assert mc.doc_to_choice(docs[0]) == docs[0]["choices"].split("|")
