"""Fixtures shared by several test files: the tiny saved checkpoints and tiny lmms-eval tasks of
``test_lmms_fixtures`` (built once per session in a temp dir, in about a second each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# One intra-op thread: the tests run tiny models, where a second thread only adds synchronisation, and on a 2-core
# machine shared with other processes torch's spinning threads made files 10-20x slower (tests/test_peer_methods.py:
# 135 s with torch's default 2 threads under load, 6 s with one).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A random tiny LLaVA + processor saved like a hub checkpoint (:func:`test_lmms_fixtures.build_tiny_llava`)."""
    from test_lmms_fixtures import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2-VL + processor (:func:`test_lmms_fixtures.build_tiny_qwen2_vl`)."""
    from test_lmms_fixtures import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """``(include path, {"gen": task, "mc": task})``: two local lmms-eval tasks (:func:`build_tiny_tasks`)."""
    from test_lmms_fixtures import build_tiny_tasks

    root = tmp_path_factory.mktemp("tasks")
    return root, build_tiny_tasks(root)
