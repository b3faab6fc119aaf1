"""The synthetic visual-QA benchmark: generator determinism, answers checked against the pixels, shipped task files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from vtw.synthvqa import build_task
from vtw.synthvqa.generator import (
    CELL,
    COLORS,
    COUNTS,
    IMAGE_SIZE,
    NUM_CHOICES,
    SHAPES,
    SPLIT_SEEDS,
    chance_accuracy,
    follow_up_turns,
    iter_items,
    make_item,
    scene_questions,
    split_words,
    vocabulary,
)

TASK_DIR = Path(__file__).resolve().parent.parent / "vtw" / "assets" / "tasks"


def test_same_seed_gives_identical_items_and_png_bytes():
    for index in (0, 7, 123):
        first, second = make_item("test", index), make_item("test", index)
        assert first == second
        assert first.png_bytes() == second.png_bytes()
    assert make_item("train", 5).png_bytes() != make_item("train", 6).png_bytes()


def test_prompt_choices_and_follow_ups():
    for item in iter_items("test", 40):
        # the short-answer instruction written out, not the generator's own constant
        assert item.prompt == f"{item.question}\nAnswer the question using a single word."
        assert len(set(item.choices)) == NUM_CHOICES and item.answer in item.choices
        # the item's own question is among the scene's unambiguous questions, with the same answer
        assert (item.question, item.answer) in {(q.question, q.answer_word) for q in scene_questions(item.scene)}
        turns = follow_up_turns(item, 3)
        assert turns == follow_up_turns(item, 3)
        assert all(prompt != item.prompt for prompt, _ in turns)
        valid = {(q.question, q.answer_word) for q in scene_questions(item.scene)}
        assert set(turns) <= valid


def test_objects_sit_on_the_patch_grid_without_touching():
    for item in iter_items("train", 200):
        blocks = []
        for obj in item.scene.objects:
            left, top, right, bottom = obj.box
            span = (obj.size + CELL - 1) // CELL
            assert span in (1, 2, 3) and obj.size == span * CELL - 4
            assert (left - 2) % CELL == 0 and (top - 2) % CELL == 0 and right < IMAGE_SIZE and bottom < IMAGE_SIZE
            blocks.append(((left - 2) // CELL, (top - 2) // CELL, span))
        for i, (c1, r1, s1) in enumerate(blocks):
            for c2, r2, s2 in blocks[i + 1 :]:
                assert c1 + s1 < c2 or c2 + s2 < c1 or r1 + s1 < r2 or r2 + s2 < r1, "blocks overlap or touch"


def test_train_and_test_are_disjoint():
    test = list(iter_items("test", 300))
    train = list(iter_items("train", 3000))
    assert {it.seed for it in test}.isdisjoint(it.seed for it in train)
    assert SPLIT_SEEDS["test"] - SPLIT_SEEDS["train"] >= 10**9
    train_images = {it.png_bytes() for it in train}
    assert not any(it.png_bytes() in train_images for it in test)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        make_item("val", 0)
    with pytest.raises(ValueError, match="out of range"):
        make_item("test", -1)
    with pytest.raises(ValueError, match="out of range"):
        make_item("test", 2.5)
    with pytest.raises(ValueError, match="count must be >= 0"):
        follow_up_turns(make_item("test", 0), -1)


def _components(item) -> list[tuple[tuple[int, int, int], int, slice, slice]]:
    """Connected non-background regions of the rendered image: (colour, pixel count, row slice, column slice)."""
    pixels = np.asarray(item.image())
    foreground = np.any(pixels != np.array(item.scene.background, dtype=np.uint8), axis=-1)
    labels, count = ndimage.label(foreground)
    regions = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels == index
        colours, counts = np.unique(pixels[inside], axis=0, return_counts=True)
        regions.append((tuple(int(c) for c in colours[counts.argmax()]), int(inside.sum()), rows, cols))
    assert len(regions) == count
    return regions


def test_answers_agree_with_the_pixels():
    """Re-derive answers from the rendered image alone (connected components), not from the scene description."""
    names = {rgb: name for name, rgb in COLORS.items()}
    checked = {"count": 0, "position": 0, "color": 0, "size": 0}
    for item in iter_items("test", 150):
        regions = _components(item)
        assert item.image().size == (IMAGE_SIZE, IMAGE_SIZE)
        assert all(colour in names for colour, *_ in regions), "objects must be drawn in the palette colours"
        if item.kind == "count":
            assert item.answer == str(len(regions))
            checked["count"] += 1
        elif item.kind == "position":
            direction = item.question.split()[4]
            centre = {
                "left": lambda r: -(r[3].start + r[3].stop),
                "right": lambda r: r[3].start + r[3].stop,
                "top": lambda r: -(r[2].start + r[2].stop),
                "bottom": lambda r: r[2].start + r[2].stop,
            }[direction]
            assert names[max(regions, key=centre)[0]] == item.answer
            checked["position"] += 1
        elif item.kind == "color":
            assert item.answer in {names[colour] for colour, *_ in regions}
            checked["color"] += 1
        elif item.kind == "size":  # objects fill 1x1, 2x2 or 3x3 cells: compare bounding-box extents
            extent = {names[colour]: rows.stop - rows.start for colour, _, rows, _ in regions}
            pick = max if "larger" in item.question else min
            assert pick(extent, key=extent.get) == item.answer
            assert list(extent.values()).count(pick(extent.values())) == 1
            checked["size"] += 1
    assert min(checked.values()) >= 10, checked


def test_answer_sets_and_chance_level():
    items = list(iter_items("test", 400))
    allowed = {"color": set(COLORS), "shape": set(SHAPES), "count": set(COUNTS)}
    allowed["position"] = allowed["size"] = set(COLORS)
    for item in items:
        assert item.answer in allowed[item.kind] and set(item.choices) <= allowed[item.kind]
        assert len(split_words(item.answer)) == 1
    # hand-derived: the answer sets have 6 (colours), 4 (shapes) or 5 (counts) members
    expected = np.mean([{"shape": 1 / 4, "count": 1 / 5}.get(it.kind, 1 / 6) for it in items])
    assert chance_accuracy(items) == pytest.approx(expected)
    assert chance_accuracy(items, multiple_choice=True) == 0.25
    assert 0.15 < chance_accuracy(items) < 0.25
    # answers are spread over their answer set (no answer dominates a kind)
    for kind, answers in allowed.items():
        seen = [it.answer for it in items if it.kind == kind]
        assert max(seen.count(a) for a in answers) < 0.5 * len(seen), kind


def test_vocabulary_covers_every_prompt_and_answer():
    words = set(vocabulary())
    for item in iter_items("train", 300):
        assert set(split_words(item.prompt)) <= words
        assert set(split_words(item.answer)) <= words
        for prompt, answer in follow_up_turns(item, 5):
            assert set(split_words(prompt)) | {answer} <= words


def test_shipped_parquet_matches_the_generator():
    table = pq.read_table(TASK_DIR / "vtw_synthvqa" / build_task.DATA_FILE)
    assert table.num_rows == build_task.TEST_ITEMS
    for index, row in enumerate(table.slice(0, 12).to_pylist()):
        item = make_item("test", index)
        assert (row["id"], row["prompt"], row["answer"], row["kind"], row["seed"]) == (
            item.item_id,
            item.prompt,
            item.answer,
            item.kind,
            item.seed,
        )
        assert row["choices"].split("|") == list(item.choices)
        shipped = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(item.image()))


def test_build_task_writes_loadable_files(tmp_path):
    written = build_task.write_task(tmp_path, count=5)
    names = ["test.parquet", "validation.parquet", "vtw_synthvqa.yaml", "vtw_synthvqa_mc.yaml"]
    assert sorted(p.name for p in written) == names
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary files left behind"
    answers = pq.read_table(tmp_path / "test.parquet").column("answer").to_pylist()
    assert answers == [make_item("test", i).answer for i in range(5)]
    validation = pq.read_table(tmp_path / "validation.parquet").to_pylist()  # the calibration split of method=auto
    assert [r["seed"] for r in validation] == [
        make_item("validation", i).seed for i in range(build_task.VALIDATION_ITEMS)
    ]
    shipped_seeds = set(pq.read_table(TASK_DIR / "vtw_synthvqa" / build_task.DATA_FILE).column("seed").to_pylist())
    assert not shipped_seeds & {r["seed"] for r in validation}  # never an evaluated item
    for task in build_task.TASKS:
        shipped = (TASK_DIR / "vtw_synthvqa" / f"{task}.yaml").read_text()
        assert (tmp_path / f"{task}.yaml").read_text() == shipped.replace("items: 500", "items: 5")
    with pytest.raises(ValueError, match="count must be a positive integer"):
        build_task.write_task(tmp_path, count=0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task.task_yaml("nope", 5)


def test_tasks_load_offline_through_lmms_eval(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = get_task_dict(list(build_task.TASKS), manager)
    item = make_item("test", 3)
    for name, metric in (("vtw_synthvqa", "exact_match"), ("vtw_synthvqa_mc", "acc")):
        task = tasks[name]
        docs = task.test_docs()
        assert len(docs) == build_task.TEST_ITEMS
        assert task.doc_to_text(docs[3]) == item.prompt
        assert task.doc_to_target(docs[3]) == item.answer
        (image,) = task.doc_to_visual(docs[3])
        assert np.array_equal(np.asarray(image), np.asarray(item.image()))
        assert list(task._metric_fn_list) == [metric]
    assert tasks["vtw_synthvqa_mc"].doc_to_choice(docs[3]) == list(item.choices)
    assert tasks["vtw_synthvqa"].OUTPUT_TYPE == "generate_until"
    assert tasks["vtw_synthvqa_mc"].OUTPUT_TYPE == "multiple_choice"
