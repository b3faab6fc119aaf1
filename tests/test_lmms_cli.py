"""lmms-eval's own CLI finds and runs the ``vtw`` model (entry point), with the same answers as the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

LIMIT = 5  # odd: with 2 processes lmms-eval pads the short rank with a copy of its last request


@pytest.mark.parametrize("procs", [1, 2])
def test_lmms_eval_cli_runs_model_vtw(tiny_llava_dir, tiny_tasks, tmp_path, procs):
    """``python -m lmms_eval --model vtw``, and the same under ``torchrun --nproc_per_node 2`` (data parallel: the
    documents split over two replicas, gathered on rank 0): every document once, the Python API's answers."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from vtw.lmms.model import VTWModel

    root, names = tiny_tasks
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"] if procs > 1 else []
    cmd = [sys.executable, *launch, "-m", "lmms_eval", "--model", "vtw", "--limit", str(LIMIT)]
    cmd += ["--model_args", f"pretrained={tiny_llava_dir},layer=2,device=cpu"]
    cmd += ["--tasks", names["gen"], "--include_path", str(root), "--batch_size", "4"]
    cmd += ["--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [p for p in out.rglob("*_results.json")]
    samples = [p for p in out.rglob(f"*_samples_{names['gen']}.jsonl")]
    assert len(results) == 1 and len(samples) == 1
    data = json.loads(results[0].read_text())
    assert "exact_match,none" in data["results"][names["gen"]]
    assert data["config"]["model"] == "vtw"
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    cli_answers = {r["doc_id"]: r["filtered_resps"] for r in rows}
    cli_answers = {k: v if isinstance(v, str) else v[0] for k, v in cli_answers.items()}
    assert sorted(r["doc_id"] for r in rows) == list(range(LIMIT))

    # the same requests through the Python API, one at a time: identical answers
    tm = TaskManager(include_path=str(root), include_defaults=False)
    task = get_task_dict([names["gen"]], tm)[names["gen"]]
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    lm = VTWModel(pretrained=str(tiny_llava_dir), layer=2, device="cpu", batch_size=1, progress=False)
    lm.task_dict[names["gen"]] = task.dataset
    api = lm.generate_until(task.instances)
    assert {r.doc_id: a.text.strip() for r, a in zip(task.instances, api)} == {
        k: v.strip() for k, v in cli_answers.items()
    }
