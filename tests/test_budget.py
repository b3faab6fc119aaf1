"""Matched compute (``vtw.budget``): the matcher against a brute force written here, its end points, the config
checks, and one sweep over methods and budgets end to end (summary per method, Pareto plot, results record the
budget asked, the parameter chosen and the TFLOPs reached)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_lmms_fixtures import pipeline_overrides

from vtw.flops import SampleCounts, count_flops, load_model_config
from vtw.flops.budget import match_budget
from vtw.io import read_json
from vtw.methods import METHODS, FastV, PyramidDrop, RandomVision, Withdrawal
from vtw.pipeline.config import compose_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CFG = load_model_config("llava-1.5-7b")
#: prompts, counted by their prefill (one generated token) as the matcher counts them
PROMPTS = [SampleCounts(576, 40, 1, vision_inputs=1), SampleCounts(576, 75, 1, vision_inputs=1), SampleCounts(0, 30, 1)]


def _ratio(method) -> float:
    """Prefill (one generated token) FLOPs of the prompts under ``method`` over the full model's, by hand."""

    def total(m):
        return sum(count_flops(CFG, p, m).total for p in PROMPTS)  # fmt: skip

    return total(method) / total(None)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_vtw_budget_picks_the_closest_layer(budget):
    ratios = {k: _ratio(Withdrawal(layer=k)) for k in range(33)}
    best = min(ratios, key=lambda k: (abs(ratios[k] - budget), -ratios[k]))
    match = match_budget(CFG, PROMPTS, Withdrawal(layer=5), budget)
    assert match.method == Withdrawal(layer=best) and match.ratio == pytest.approx(ratios[best])
    assert all(abs(match.ratio - budget) <= abs(r - budget) for r in ratios.values())


@pytest.mark.parametrize("budget", [0.45, 0.6, 0.8])
def test_keep_methods_reach_the_budget_within_one_grid_step(budget):
    """FastV's and random pruning's ratio grows with keep; the choice is within one 0.005 keep step of F (checked
    against ratios computed here at keep +- 0.005), and its layer is the one given."""
    for method in (FastV(layer=2, keep=0.5), RandomVision(layer=2, keep=0.5, seed=3)):
        match = match_budget(CFG, PROMPTS, method, budget)
        chosen = match.method
        assert (chosen.layer, type(chosen)) == (2, type(method))
        assert getattr(chosen, "seed", 3) == 3
        lo = _ratio(type(method)(**{**method.params(), "keep": max(0.005, round(chosen.keep - 0.005, 3))}))
        hi = _ratio(type(method)(**{**method.params(), "keep": min(1.0, round(chosen.keep + 0.005, 3))}))
        assert abs(match.ratio - budget) <= min(abs(lo - budget), abs(hi - budget)) + 1e-12
        assert lo <= match.ratio <= hi


def test_pdrop_budget_scales_every_share_and_one_is_the_full_model():
    match = match_budget(CFG, PROMPTS, PyramidDrop(), 0.5)
    keep = match.method.keep
    assert keep[0] / keep[1] == pytest.approx(2, rel=1e-3) and keep[1] / keep[2] == pytest.approx(2, rel=1e-3)
    assert abs(match.ratio - 0.5) < 0.02
    for method in (Withdrawal(layer=3), FastV(), RandomVision(), PyramidDrop()):
        full = match_budget(CFG, PROMPTS, method, 1.0)
        assert full.ratio == 1.0 and not [k for k in full.method.resolve(32).stages() if k < 32], method


VIDEO_CFG = load_model_config("video-llava-7b")
VIDEO_PROMPTS = [
    SampleCounts(8 * 257, 40, 1, video_frames=8),
    SampleCounts(8 * 257 + 256, 60, 1, video_frames=8, vision_inputs=1),
]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_matches_a_budget_and_one_is_the_full_model(name):
    """Every method of the registry, at its defaults, on LLaVA-1.5-7B (a video method: Video-LLaVA-7B videos): F = 0.5
    is the candidate closest to 0.5 among all of its candidates (their ratios computed here, the full model's FLOPs
    by hand at each), and F = 1 is the full model (ratio exactly 1)."""
    method = METHODS[name]()
    try:
        method.check_supported(CFG)
        cfg, prompts = CFG, PROMPTS
    except ValueError:
        cfg, prompts = VIDEO_CFG, VIDEO_PROMPTS
    full = sum(count_flops(cfg, p).total for p in prompts)  # fmt: skip

    def ratio(m):
        return sum(count_flops(cfg, p, m).total for p in prompts) / full  # fmt: skip

    ratios = [ratio(m) for m in method.budget_candidates(32)]
    half = match_budget(cfg, prompts, method, 0.5)
    assert all(abs(half.ratio - 0.5) <= abs(r - 0.5) + 1e-12 for r in ratios) and abs(half.ratio - 0.5) < 0.08
    assert half.ratio == pytest.approx(ratio(half.method)) and type(half.method) is type(method)
    one = match_budget(cfg, prompts, method, 1.0)
    assert one.ratio == 1.0, one.method  # exactly: every layer sees every token and nothing is spent scoring


def test_budget_config_checks():
    for overrides, needle in [
        (["vtw.budget=0"], "vtw.budget must be a number in (0, 1]"),
        (["vtw.budget=1.5"], "got 1.5"),
        (["vtw=auto", "vtw.budget=0.5"], "give one of them"),
        (["vtw.method=fastv", "vtw=auto"], "needs a layer"),
        (["vtw.keep=0.5"], "vtw.keep=0.5 is not a parameter of vtw.method=vtw"),
        (["vtw.method=pdrop", "vtw.layers=[3,2,1]"], "strictly increasing"),
        (["vtw.method=random_vision", "vtw.keep=2"], "random_vision keep must be a number in (0, 1]"),
    ]:
        with pytest.raises(ValueError) as info:
            validate_config(compose_config(overrides))
        assert needle in str(info.value), (overrides, str(info.value))
    spec = validate_config(compose_config(["vtw.method=pdrop", "vtw.layers=[1,3,5]", "vtw.budget=0.4"]))
    assert spec.reduction(2) == PyramidDrop(layers=(1, 3, 5)) and spec.vtw.budget == 0.4
    assert spec.reduction(None) == Withdrawal()  # vtw.layer=null: the full model, whatever the method


def test_method_budget_sweep_end_to_end(tiny_llava_dir, tiny_tasks, tmp_path):
    root, names = tiny_tasks
    sweep = tmp_path / "sweep"
    args = ["-m", "vtw.method=vtw,fastv", "vtw.budget=0.5,1", "vtw.layer=1", "logger.mode=offline",
            *pipeline_overrides(tiny_llava_dir, root, [names["gen"]]), f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=400)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if (d / "results.json").is_file())
    results = {(r["config"]["vtw"]["method"], r["config"]["vtw"]["budget"]): r
               for r in (read_json(d / "results.json") for d in jobs)}  # fmt: skip
    assert set(results) == {("vtw", 0.5), ("vtw", 1.0), ("fastv", 0.5), ("fastv", 1.0)}
    for (method, budget), r in results.items():
        b = r["budget"]
        assert b["budget"] == budget and b["parameter"] == ("layer" if method == "vtw" else "keep")
        assert abs(b["ratio"] - budget) < 0.2 and r["result"]["budget_ratio"] == b["ratio"]
        if budget == 1.0:  # the whole compute: no reduction, for every method
            assert r["result"]["label"] == "baseline"
            assert b["ratio"] == 1.0
        else:
            assert (
                r["result"]["label"] == method and r["result"]["params"][b["parameter"]] == b["params"][b["parameter"]]
            )
            saved = r["result"]["tflops_saved_pct"]
            assert 30 < saved < 70, saved  # prefill matched at 0.5; decode steps move it a little
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method_label"] for r in rows if r["variant"] != "baseline"} == {
        results[("vtw", 0.5)]["result"]["method_label"], results[("fastv", 0.5)]["result"]["method_label"]
    }  # fmt: skip
    assert all(math.isclose(float(r["budget"]), 0.5) or math.isclose(float(r["budget"]), 1.0) for r in rows)
    assert (sweep / "pareto.png").stat().st_size > 1000
    # the W&B sweep run's scatter data carries the method of every point (the chart groups by it)
    from wandb_offline import find_offline_runs, read_offline_run

    (run,) = [read_offline_run(r) for r in find_offline_runs(sweep / "wandb")]
    table = run.tables["accuracy_vs_tflops_table"]
    methods = sorted(dict(zip(table["columns"], row))["method"] for row in table["data"])
    assert methods == ["baseline", "baseline", "fastv", "vtw"]  # budget 1: both methods' jobs are the full model
