"""Sweeps: ``python run.py -m`` in a subprocess (results per job, summary, Pareto plot, W&B sweep run), a sweep
with a failing job, the summarize command, and the summary / frontier logic on hand-made job directories."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_lmms_fixtures import pipeline_overrides

from vtw.io import read_json
from vtw.pipeline.pareto import pareto_frontier
from vtw.pipeline.results import RunResult, VariantResult, write_results
from vtw.pipeline.status import JobStatus, job_index, read_job_dir, record_finished
from vtw.pipeline.summary import summarize_sweep

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(args, cwd, timeout=240):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout
    )


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_each_job_and_a_summary(tiny_llava_dir, tiny_tasks, tmp_path):
    from wandb_offline import find_offline_runs, read_offline_run

    root, names = tiny_tasks
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "vtw.layer=null,1,2",
        *pipeline_overrides(tiny_llava_dir, root, [names["gen"]]),
        "logger.mode=offline",
    ]
    p = _run([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if (d / "job.json").is_file())
    assert [d.name for d in jobs] == ["0_tinytest_tinytasks_base", "1_tinytest_tinytasks_K1", "2_tinytest_tinytasks_K2"]
    results = [read_json(d / "results.json") for d in jobs]
    assert [r["result"]["layer"] for r in results] == [None, 1, 2]
    assert all(r["baseline"] is None for r in results)  # compare_baseline=auto: not in a sweep
    rows = _csv(sweep / "summary.csv")
    assert [(r["status"], r["layer"]) for r in rows] == [("ok", ""), ("ok", "1"), ("ok", "2")]
    for row, res in zip(rows, results):
        assert float(row["tflops"]) == pytest.approx(res["result"]["tflops"], rel=1e-5)
        assert float(row["accuracy"]) == pytest.approx(res["result"]["accuracy"])
    assert float(rows[1]["tflops"]) < float(rows[2]["tflops"]) < float(rows[0]["tflops"])
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 jobs: 3 ok, 0 failed" in (sweep / "summary.md").read_text()
    assert "sweep" in p.stdout and "0_tinytest_tinytasks_base" in p.stdout  # the rich table
    # W&B: one run per job in the sweep's group, plus the sweep's summary run
    job_runs = [read_offline_run(r) for d in jobs for r in find_offline_runs(d / "wandb")]
    sweep_runs = [read_offline_run(r) for r in find_offline_runs(sweep / "wandb")]
    assert len(job_runs) == 3 and len(sweep_runs) == 1
    group = sweep_runs[0].group
    assert {r.group for r in job_runs} == {group} and sweep_runs[0].job_type == "sweep"
    assert sorted(r.name for r in job_runs) == [
        "tinytest-tinytasks-K1",
        "tinytest-tinytasks-K2",
        "tinytest-tinytasks-base",
    ]
    table = sweep_runs[0].tables["summary_table"]
    t = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [x["tflops"] for x in t] == pytest.approx([r["result"]["tflops"] for r in results])
    assert "accuracy_vs_tflops_table" in sweep_runs[0].tables  # the scatter's data


def test_sweep_with_a_failing_job_keeps_and_summarises_the_others(tiny_llava_dir, tiny_tasks, tmp_path):
    root, names = tiny_tasks
    sweep = tmp_path / "sweep"
    over = pipeline_overrides(tiny_llava_dir, root, [names["gen"]], "logger=none", "vtw.layer=1")
    over = [o for o in over if not o.startswith("dataset.tasks=")]
    p = _run(["-m", f"dataset.tasks=[{names['gen']}],[no_such_task]", *over, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _csv(sweep / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "no_such_task" in rows[1]["error"] and rows[0]["accuracy"] != ""
    ok_dir, bad_dir = Path(rows[0]["job_dir"]), Path(rows[1]["job_dir"])
    assert (ok_dir / "results.json").is_file() and not (bad_dir / "results.json").exists()
    assert read_json(bad_dir / "job.json")["status"] == "failed"
    assert "Failed jobs" in (sweep / "summary.md").read_text()
    # the summarize command on the same directory
    cmd = [sys.executable, "-m", "vtw.pipeline.summarize"]
    q = subprocess.run([*cmd, str(sweep)], capture_output=True, text=True, env=ENV, timeout=120)
    assert q.returncode == 1 and "no_such_task" in q.stdout
    q = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True, env=ENV, timeout=120)
    assert q.returncode == 2 and "does not exist" in q.stderr


# ---------------------------------------------------------------------------------------------- summary logic
def test_pareto_frontier_by_hand():
    pts = [(5.0, 0.80), (3.0, 0.78), (4.0, 0.70), (2.0, 0.60), (3.0, 0.75), (6.0, 0.80)]
    # cheapest first: (2, .60) ok; (3, .78) beats it; (3, .75) dominated; (4, .70) dominated; (5, .80) ok; (6, .80) not
    assert pareto_frontier(pts) == [3, 1, 0]
    assert pareto_frontier([]) == []


def test_pareto_point_labels_do_not_overlap():
    """Twelve labels on four nearly coincident points: most are placed, and every label placed has a box that overlaps
    no other label's box and stays inside the axes (boxes measured by matplotlib's renderer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vtw.pipeline.pareto import _place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1)
    pts = [(50 + (i % 4) * 0.1, 0.5 + (i % 4) * 0.002, f"keep={i / 10:.2f} K=2", "k") for i in range(12)]
    _place_labels(fig, ax, pts)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    assert 10 <= len(boxes) <= 12
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for b in boxes[i + 1 :])
    plt.close(fig)


def _variant(label, layer, acc, tflops, full) -> VariantResult:
    return VariantResult(
        label=label, layer=layer, method="vtw", metrics={"t/acc": acc}, accuracy=acc, num_samples=10,
        tflops=tflops, tflops_full=full, tflops_saved_pct=100 * (1 - tflops / full), paper_tflops=tflops / 2,
        paper_tflops_full=full / 2, paper_tflops_saved_pct=100 * (1 - tflops / full), latency_s=0.1,
        samples_per_s=10.0, generated_tokens=3.0, vision_tokens=576.0, text_tokens=40.0, peak_mem_gb=1.0,
        peak_mem_kind="cpu_max_rss", wall_s=1.0,
    )  # fmt: skip


def _job(d: Path, main: VariantResult, baseline: VariantResult | None = None, samples: list[dict] = ()) -> None:
    r = RunResult(
        name=d.name, model="m", pretrained="p", family="llava", num_layers=32, dataset="d", tasks=["t"], limit=None,
        layer_requested=main.layer, primary_metric="t/acc", result=main, baseline=baseline, config={}, config_hash="h",
        git={}, packages={}, job={},
    )  # fmt: skip
    JobStatus(d, name=d.name).finish("ok")
    write_results(d, r, list(samples))


def test_summarize_hand_made_jobs(tmp_path):
    _job(tmp_path / "0", _variant("vtw", 8, 0.70, 4.0, 10.0), baseline=_variant("baseline", None, 0.80, 10.0, 10.0))
    _job(tmp_path / "1", _variant("vtw", 16, 0.79, 6.0, 10.0))
    _job(tmp_path / "2", _variant("baseline", None, 0.80, 10.0, 10.0))  # a second baseline: one point only
    JobStatus(tmp_path / "10", name="x").fail(RuntimeError("CUDA out of memory"))
    JobStatus(tmp_path / "3", name="y").start()  # still running (or killed)
    s = summarize_sweep(tmp_path, console=False)
    assert [r["job"] for r in s.rows] == ["0", "0", "1", "2", "3", "10"]  # natural order, baseline row first
    assert (s.jobs, s.ok, s.failed, s.count("running")) == (5, 3, 1, 1)
    assert s.failed_jobs[0]["error"] == "CUDA out of memory"
    pts = s.points()
    assert sorted((p["layer"] or 99) for p in pts) == [8, 16, 99]
    rows = _csv(tmp_path / "summary.csv")
    assert rows[1]["variant"] == "vtw" and float(rows[1]["tflops_saved_pct"]) == pytest.approx(60.0)
    assert rows[0]["t/acc"] == "0.8" and rows[5]["status"] == "failed"
    md = (tmp_path / "summary.md").read_text()
    assert "5 jobs: 3 ok, 1 failed, 1 running" in md and "CUDA out of memory" in md
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_a_column_added_to_the_one_list_shows_everywhere(tmp_path, monkeypatch):
    """One new entry in ``results.COLUMNS`` (here the existing field ``wall_s``) reaches summary.csv, summary.md,
    both terminal tables, the W&B run summary (and results.json's) and the W&B sweep table."""
    import io

    from rich.console import Console
    from wandb_offline import find_offline_runs, read_offline_run

    from vtw.pipeline import results
    from vtw.pipeline.report import run_table
    from vtw.pipeline.results import Column, read_results
    from vtw.pipeline.schema import LoggerConf
    from vtw.pipeline.wandb_logger import log_job, log_sweep

    outputs = (results.CSV, results.MD, results.TABLE, results.WANDB, results.SUMMARY, results.JOB)
    wall = Column("wall_s", frozenset(outputs), header="wall clock", label="wall clock s")
    monkeypatch.setattr(results, "COLUMNS", (*results.COLUMNS, wall))
    base = dataclasses.replace(_variant("baseline", None, 0.80, 10.0, 10.0), wall_s=12.5)
    _job(tmp_path / "0", dataclasses.replace(_variant("vtw", 8, 0.70, 4.0, 10.0), wall_s=7.25), baseline=base)
    console = Console(file=io.StringIO(), width=250, color_system=None)
    s = summarize_sweep(tmp_path, plot=False, console=console)
    rows = _csv(tmp_path / "summary.csv")
    assert [r["wall_s"] for r in rows] == ["12.5", "7.25"]
    md = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert md[0].endswith("| wall_s |") and md[2].endswith("| 12.5 |") and md[3].endswith("| 7.25 |")
    table = console.file.getvalue().splitlines()
    header = next(line for line in table if "job" in line and "status" in line)
    assert header.rstrip().endswith("wall clock ┃")
    assert [line.split("│")[-2].strip() for line in table if line.startswith("│")] == ["12.5", "7.25"]

    result = read_results(tmp_path / "0")
    assert (result.summary()["wall_s"], result.summary()["baseline/wall_s"]) == (7.25, 12.5)
    assert read_json(tmp_path / "0" / "results.json")["summary"]["wall_s"] == 7.25
    job = Console(file=io.StringIO(), width=250, color_system=None)
    job.print(run_table(result))
    (line,) = [line for line in job.file.getvalue().splitlines() if "wall clock s" in line]
    assert [c.strip() for c in line.split("│")[2:4]] == ["12.5", "7.25"]

    spec = LoggerConf(name="wandb", mode="offline")
    assert log_job(spec, result, [], out_dir=tmp_path / "0", group="g")["status"] == "logged"
    assert log_sweep(spec, s, group="g")["status"] == "logged"
    (run,) = [read_offline_run(r) for r in find_offline_runs(tmp_path / "0" / "wandb")]
    assert (run.summary["wall_s"], run.summary["baseline/wall_s"]) == (7.25, 12.5)
    (sweep,) = [read_offline_run(r) for r in find_offline_runs(tmp_path / "wandb")]
    t = sweep.tables["summary_table"]
    assert [dict(zip(t["columns"], row))["wall_s"] for row in t["data"]] == [12.5, 7.25]


# ---------------------------------------------------------------------------------------------- job state
def test_job_state_from_job_json_and_results(tmp_path):
    """Every state, each from hand-written files: what job.json says, checked against results.json."""
    ok = _variant("vtw", 8, 0.7, 4.0, 10.0)
    d = {name: tmp_path / name for name in ("ok", "skipped", "failed", "running", "no_results", "bad", "flops", "bare")}
    _job(d["ok"], ok)
    _job(d["skipped"], ok)
    (d["skipped"] / "job.json").write_text(json.dumps({"status": "skipped", "resumed_from": "x"}))
    JobStatus(d["failed"]).fail(RuntimeError("boom"))
    JobStatus(d["running"]).start()
    JobStatus(d["no_results"]).finish("ok")  # an eval job that says ok but whose results are gone
    _job(d["bad"], ok)
    (d["bad"] / "results.json").write_text(json.dumps({"schema": "vtw.results/0", "status": "ok"}))
    JobStatus(d["flops"]).start(mode="flops")  # flops / search jobs write no results.json
    JobStatus(d["flops"]).finish("ok", mode="flops")
    _job(d["bare"], ok)
    (d["bare"] / "job.json").unlink()  # results copied by hand, no job.json
    states = {name: read_job_dir(path).state for name, path in d.items()}
    assert states == {"ok": "ok", "skipped": "skipped", "failed": "failed", "running": "running",
                      "no_results": "running", "bad": "running", "flops": "ok", "bare": "ok"}  # fmt: skip
    assert read_job_dir(tmp_path / "nothing").state == "missing"
    assert [read_job_dir(d[n]).done for n in ("ok", "skipped", "failed", "no_results")] == [True, True, False, False]
    # The summary reads the same states.
    rows = {r["job"]: r["status"] for r in summarize_sweep(tmp_path, write=False, plot=False, console=False).rows}
    assert {k: rows[k] for k in d} == states


def test_job_index_finds_finished_jobs_by_config_hash_under_a_root(tmp_path):
    def job(path: Path, config_hash: str, status: str = "ok") -> Path:
        r = RunResult(
            name="j", model="m", pretrained="p", family="llava", num_layers=32, dataset="d", tasks=["t"], limit=None,
            layer_requested=8, primary_metric="t/acc", result=_variant("vtw", 8, 0.7, 4.0, 10.0), baseline=None,
            config={}, config_hash=config_hash, git={}, packages={}, job={},
        )  # fmt: skip
        write_results(path, r, [])
        js = JobStatus(path)
        js.fail(RuntimeError("x")) if status == "failed" else js.finish(status)
        return path

    a = job(tmp_path / "multirun" / "day" / "t1" / "0_a", "aaa")
    job(tmp_path / "run" / "day" / "t2", "bbb", status="failed")  # finished files, but the job failed
    c = job(tmp_path / "deep" / "x" / "y" / "z" / "w" / "c", "ccc")
    job(tmp_path / "multirun" / "day" / "t1" / "0_a" / "wandb" / "inner", "ddd")  # never inside a job dir
    index = job_index(tmp_path, fresh=True)
    assert (index.find("aaa"), index.find("bbb"), index.find("ccc"), index.find("ddd")) == (a, None, c, None)
    # Built once per process: a job finished elsewhere later is not seen until asked for fresh ...
    e = job(tmp_path / "later", "eee")
    assert job_index(tmp_path).find("eee") is None and job_index(tmp_path, fresh=True).find("eee") == e
    # ... but a job finished in this process is recorded in the indexes that cover it.
    f = job(tmp_path / "mine", "fff")
    record_finished("fff", f)
    assert job_index(tmp_path).find("fff") == f


def test_a_sweep_with_bad_points_is_refused_whole_before_any_job(tiny_llava_dir, tiny_tasks, tmp_path):
    """The sweep check (``hydra.callbacks.sweep_check``): every bad point named with what is allowed, nothing run,
    no sweep directory, exit 1; ``enabled=false`` gives back the point-by-point failures (the good point runs)."""
    root, names = tiny_tasks
    sweep = tmp_path / "sweep"
    over = pipeline_overrides(tiny_llava_dir, root, [names["gen"]], "logger=none")
    p = _run(["-m", "vtw.layer=1,50", "vtw.method=vtw,nosuch", *over, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.startswith("  #")]
    assert "vtw: 3 of 4 sweep points are invalid; nothing ran" in p.stderr
    assert [ln.split(":")[0] for ln in lines] == ["#1 vtw.layer=1 vtw.method=nosuch", "#2 vtw.layer=50 vtw.method=vtw",
                                                  "#3 vtw.layer=50 vtw.method=nosuch"]  # fmt: skip
    assert "is not allowed; allowed: vtw, " in lines[0] and "allowed 0..4" in lines[1], lines
    assert not sweep.exists() and "Launching" not in p.stdout + p.stderr
    p = _run(["-m", "vtw.layer=1,50", *over, f"hydra.sweep.dir={sweep}", "hydra.callbacks.sweep_check.enabled=false"],
             cwd=tmp_path)  # fmt: skip
    assert p.returncode == 1 and [r["status"] for r in _csv(sweep / "summary.csv")] == ["ok", "failed"]


def test_sweep_points_by_hand():
    from vtw.pipeline.sweep_check import sweep_points

    assert sweep_points(["a=1,2", "b=x", "c=range(0,3)"]) == [
        ["a=1", "b=x", "c=0"], ["a=1", "b=x", "c=1"], ["a=1", "b=x", "c=2"],
        ["a=2", "b=x", "c=0"], ["a=2", "b=x", "c=1"], ["a=2", "b=x", "c=2"],
    ]  # fmt: skip
    assert sweep_points(["b=1", "a=3,4"], {"a": "1,2", "c": "choice(u,v)"}) == [
        ["a=3", "c=u", "b=1"], ["a=3", "c=v", "b=1"], ["a=4", "c=u", "b=1"], ["a=4", "c=v", "b=1"]
    ]  # fmt: skip  # the command line's value of a params key replaces it, in the key's place
    assert sweep_points(["model=glob(*)"]) is None and sweep_points(["lr=interval(0,1)"]) is None
    assert sweep_points([]) == [[]]
