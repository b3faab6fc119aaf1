"""Smoke test of the embedded default: ``python run.py`` with no arguments (tiny-llava on synthvqa, CPU, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtw.io import read_json

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "vtw" / "assets"
MISSING = [p for p in (ASSETS / "tiny-llava" / "config.json", ASSETS / "tasks" / "vtw_synthvqa") if not p.exists()]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"embedded default assets not built yet: {[str(p) for p in MISSING]}")
def test_python_run_py_with_no_arguments(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WANDB_API_KEY", None)
    p = subprocess.run([sys.executable, str(ROOT / "run.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    found = list((tmp_path / "outputs" / "run").glob("*/*/results.json"))
    assert len(found) == 1
    res = read_json(found[0])
    base, vtw = res["baseline"], res["result"]
    assert res["model"] == "tiny-llava" and res["dataset"] == "synthvqa"
    assert base["layer"] is None and vtw["layer"] == res["config"]["model"]["default_layer"]
    assert base["accuracy"] >= 0.9  # the tiny model is trained: far above chance (about 0.18)
    assert vtw["accuracy"] >= base["accuracy"] - 0.01  # the default K sits on the plateau of the curve
    assert 0 < vtw["tflops_saved_pct"] < 100 and vtw["tflops"] < base["tflops"]
    for head in ("baseline (K=L", f"vtw (K={vtw['layer']})", "TFLOPs / sample", res["primary_metric"]):
        assert head in p.stdout, head
    assert list((found[0].parent / "wandb").glob("offline-run-*"))  # W&B offline by default
