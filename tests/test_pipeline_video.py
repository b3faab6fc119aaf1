"""The video path through the pipeline on a CPU: ``python run.py model=tiny-video-llava dataset=vtw_synthvideo`` end
to end (the shipped trained tiny Video-LLaVA, the shipped clips), and a job whose task has an unreadable video:
the others are evaluated, the bad sample's row names the file and the document."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_lmms_fixtures import build_tiny_video_tasks, pipeline_overrides

from vtw.io import read_json, read_jsonl
from vtw.pipeline.config import compose_config
from vtw.pipeline.job import JobContext, run_job

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "vtw" / "assets" / "tiny-video-llava"
CLIPS = ROOT / "vtw" / "assets" / "tasks" / "vtw_synthvideo" / "videos"
CLIP_TOKENS = 8 * (
    16 + 1
)  # 8 frames of 4 x 4 patches + CLS (the shipped tiny Video-LLaVA: 64 px frames, 16 px patches)


def test_run_py_video_family_on_the_synthetic_video_task(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), "model=tiny-video-llava", "dataset=vtw_synthvideo",
           "dataset.limit=9", "logger=none", "progress=false"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (found,) = (tmp_path / "outputs" / "run").glob("*/*/results.json")
    res = read_json(found)
    assert (res["model"], res["dataset"], res["primary_metric"]) == ("tiny-video-llava", "vtw_synthvideo",
                                                                     "vtw_synthvideo/exact_match")  # fmt: skip
    vtw, base = res["result"], res["baseline"]
    assert vtw["layer"] == 2 and base["layer"] is None and vtw["num_samples"] == base["num_samples"] == 9
    assert vtw["vision_tokens"] == base["vision_tokens"] == CLIP_TOKENS
    assert 0 < vtw["tflops_saved_pct"] < 100
    rows = read_jsonl(found.parent / "samples.jsonl")
    assert len(rows) == 18 and all(r["vision_tokens"] == CLIP_TOKENS for r in rows)


def test_a_job_with_an_unreadable_video_keeps_the_other_samples(tmp_path):
    videos = [str(CLIPS / "test-000000.mp4"), str(tmp_path / "missing.mp4"), str(CLIPS / "test-000003.mp4")]
    names = build_tiny_video_tasks(tmp_path / "tasks", videos, prefix="vtwbadjob")
    cfg = compose_config(pipeline_overrides(ASSET, tmp_path / "tasks", [names["gen"]], "vtw.layer=2"))
    outcome = run_job(cfg, JobContext(output_dir=tmp_path / "job"))
    assert outcome.status == "ok"
    rows = {r["doc_id"]: r for r in read_jsonl(tmp_path / "job" / "samples.jsonl") if r["variant"] != "baseline"}
    assert sorted(rows) == [0, 1, 2]
    assert "missing.mp4" in rows[1]["error"] and "doc 1" in rows[1]["error"] and rows[1]["response"] == ""
    assert "error" not in rows[0] and rows[0]["vision_tokens"] == CLIP_TOKENS and rows[2]["vision_tokens"] == 16
    assert read_json(tmp_path / "job" / "results.json")["result"]["num_samples"] == 2
