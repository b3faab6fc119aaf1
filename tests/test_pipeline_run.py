"""One job end to end, in process (``run_job``): results files against an independent recomputation from the
per-sample rows, W&B offline read back against ``results.json``, determinism, resume, W&B failures."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_lmms_fixtures import pipeline_overrides
from wandb_offline import find_offline_runs, read_offline_run

from vtw.io import read_json, read_jsonl
from vtw.pipeline.config import compose_config
from vtw.pipeline.envinfo import LOCK_FILE
from vtw.pipeline.job import JobContext, find_finished, run_job

TIMING_KEYS = {"latency_s"}


@pytest.fixture(scope="module")
def overrides(tiny_llava_dir, tiny_tasks):
    root, names = tiny_tasks
    return pipeline_overrides(tiny_llava_dir, root, [names["gen"], names["mc"]], "vtw.layer=2")


@pytest.fixture(scope="module")
def first_run(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    cfg = compose_config([*overrides, "compare_baseline=true", "logger=wandb", "logger.mode=offline"])
    outcome = run_job(cfg, JobContext(output_dir=out))
    return out, outcome


def test_job_writes_results_consistent_with_its_samples(first_run, tiny_tasks):
    out, outcome = first_run
    assert outcome.status == "ok"
    job = read_json(out / "job.json")
    assert job["status"] == "ok" and job["config_hash"] == outcome.result.config_hash
    res = read_json(out / "results.json")
    samples = read_jsonl(out / "samples.jsonl")
    _, names = tiny_tasks
    assert res["schema"] == "vtw.results/1" and res["status"] == "ok"
    assert res["primary_metric"] == f"{names['gen']}/exact_match"  # first metric of the first task
    assert res["config"]["vtw"]["layer"] == 2 and res["packages"]["transformers"]
    assert set(res["git"]) == {"commit", "dirty"}
    lock = LOCK_FILE.read_bytes()
    assert res["lock"]["sha256"] == hashlib.sha256(lock).hexdigest() and res["lock"]["packages"] > 100
    assert res["lock"]["locked"] == (not res["lock"]["mismatches"])
    for variant in ("baseline", "result"):
        v = res[variant]
        rows = [s for s in samples if s["variant"] == v["label"]]
        assert len(rows) == v["num_samples"] == 12  # 6 generation + 6 multiple-choice samples
        for task, metric in ((names["gen"], "exact_match"), (names["mc"], "acc")):
            scores = [s["scores"][metric] for s in rows if s["task"] == task]
            assert v["metrics"][f"{task}/{metric}"] == pytest.approx(sum(scores) / len(scores))
        assert v["tflops"] == pytest.approx(sum(s["tflops"] for s in rows) / len(rows))
        saved = 100 * (1 - sum(s["flops"] for s in rows) / sum(s["flops_full"] for s in rows))
        assert v["tflops_saved_pct"] == pytest.approx(saved)
        assert v["latency_s"] == pytest.approx(sum(s["latency_s"] for s in rows) / len(rows))
        assert v["peak_mem_gb"] > 0
        mc = [s for s in rows if s["task"] == names["mc"]]
        assert all(s["requests"] == 4 for s in mc)  # one loglikelihood request per option
    base, vtw = res["baseline"], res["result"]
    assert (base["layer"], vtw["layer"]) == (None, 2)
    assert base["tflops_saved_pct"] == 0 and base["tflops"] == pytest.approx(vtw["tflops_full"])
    assert 0 < vtw["tflops_saved_pct"] < 100 and 0 < vtw["paper_tflops_saved_pct"] < 100
    summary = res["summary"]
    assert summary["tflops"] == vtw["tflops"] and summary["baseline/tflops"] == base["tflops"]
    assert summary[f"{names['mc']}/acc"] == vtw["metrics"][f"{names['mc']}/acc"]


def test_wandb_offline_run_equals_results_json(first_run):
    out, _ = first_run
    res = read_json(out / "results.json")
    runs = find_offline_runs(out / "wandb")
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.name == res["name"] and run.group == out.parent.name + "-" + out.name
    assert run.config == res["config"]
    logged = {k: v for k, v in run.summary.items() if not k.startswith(("_", "samples."))}
    expected = {k: v for k, v in res["summary"].items() if v is not None}
    expected["config_hash"] = res["config_hash"]
    assert logged.keys() == expected.keys()
    for k, v in expected.items():
        assert logged[k] == pytest.approx(v), k
    table = run.tables["samples"]
    assert len(table["data"]) == len(read_jsonl(out / "samples.jsonl"))
    cols = table["columns"]
    assert {"variant", "layer", "task", "doc_id", "response", "tflops"} <= set(cols)


def test_same_seed_and_config_give_identical_results(first_run, overrides, tmp_path):
    out1, _ = first_run
    cfg = compose_config([*overrides, "compare_baseline=true", "logger=none"])
    run_job(cfg, JobContext(output_dir=tmp_path))
    r1, r2 = read_json(out1 / "results.json"), read_json(tmp_path / "results.json")
    for v in ("baseline", "result"):
        assert r1[v]["metrics"] == r2[v]["metrics"] and r1[v]["tflops"] == r2[v]["tflops"]
    assert r1["config_hash"] == r2["config_hash"]  # the logger is not part of the experiment's identity

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert strip(read_jsonl(out1 / "samples.jsonl")) == strip(read_jsonl(tmp_path / "samples.jsonl"))


def test_resume_skips_a_finished_identical_config(first_run, overrides, tmp_path, monkeypatch):
    out1, _ = first_run
    import vtw.pipeline.evaluate as ev

    def no_model(*a, **k):
        raise AssertionError("resume=true must not load the model for a finished config")

    monkeypatch.setattr(ev, "make_model", no_model)
    cfg = compose_config(
        [*overrides, "compare_baseline=true", "resume=true", f"resume_root={out1.parent}", "logger=none"]
    )
    outcome = run_job(cfg, JobContext(output_dir=tmp_path / "again"))
    assert outcome.status == "skipped" and outcome.resumed_from == out1
    job = read_json(tmp_path / "again" / "job.json")
    assert job["status"] == "skipped" and job["resumed_from"] == str(out1)
    assert (tmp_path / "again" / "results.json").read_bytes() == (out1 / "results.json").read_bytes()
    # a different experiment is not "finished"
    other = compose_config([*overrides, "compare_baseline=true", "vtw.layer=1"])
    from vtw.pipeline.config import resolved_config

    assert find_finished(resolved_config(other), tmp_path / "x", out1.parent) is None


def test_wandb_trouble_never_fails_the_job(first_run, monkeypatch):
    import wandb

    from vtw.pipeline.results import read_results
    from vtw.pipeline.schema import LoggerConf
    from vtw.pipeline.wandb_logger import log_job

    out, _ = first_run
    result = read_results(out)

    def broken(*a, **k):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    info = log_job(LoggerConf(name="wandb", mode="offline"), result, [], out_dir=out / "wb2", group="g")
    assert info["status"] == "failed" and "W&B is down" in info["error"]
    assert log_job(LoggerConf(name="none"), result, [], out_dir=out, group="g") == {"status": "disabled"}


def test_wandb_trouble_after_init_closes_the_run_as_failed(first_run, monkeypatch, tmp_path):
    """A run that W&B opened and that then fails (job or sweep) is finished with exit code 1, and the caller gets
    the failed status with the error; nothing raises."""
    import wandb

    from vtw.pipeline.results import read_results
    from vtw.pipeline.schema import LoggerConf
    from vtw.pipeline.wandb_logger import log_job, log_sweep

    class BrokenSummary(dict):
        def update(self, *a, **k):
            raise OSError("disk full")

    finished = []

    class FakeRun:
        summary = BrokenSummary()
        dir = str(tmp_path / "wandb" / "run" / "files")
        id = "fake"

        def log(self, payload):
            pass

        def finish(self, exit_code=0):
            finished.append(exit_code)

    class FakeSummary:
        sweep_dir = tmp_path / "sweep"
        jobs, ok, failed, paths, rows = 0, 0, 0, {}, []

    out, _ = first_run
    monkeypatch.setattr(wandb, "init", lambda *a, **k: FakeRun())
    spec = LoggerConf(name="wandb", mode="offline")
    info = log_job(spec, read_results(out), [], out_dir=tmp_path / "wb", group="g")
    assert info == {"status": "failed", "error": "OSError: disk full"}
    assert log_sweep(spec, FakeSummary(), group="g") == {"status": "failed", "error": "OSError: disk full"}
    assert finished == [1, 1]


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    from vtw.pipeline.wandb_logger import resolve_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    mode, message = resolve_mode("online")
    assert mode == "offline" and "credentials" in message
    assert resolve_mode("offline") == ("offline", None) and resolve_mode("disabled") == ("disabled", None)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("online") == ("online", None)


def test_failed_job_is_recorded(overrides, tmp_path):
    cfg = compose_config([*overrides, "dataset.tasks=[no_such_task]", "logger=none"])
    with pytest.raises(ValueError, match="no_such_task"):
        run_job(cfg, JobContext(output_dir=tmp_path))
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["status"] == "failed" and "no_such_task" in job["error"] and job["error_type"] == "ValueError"
    assert not (tmp_path / "results.json").exists()


def test_flops_mode_plans_without_weights(tmp_path):
    cfg = compose_config(["mode=flops", "model=llava-1.5-7b", "logger=none"])
    assert run_job(cfg, JobContext(output_dir=tmp_path)).status == "ok"
    plan = read_json(tmp_path / "flops.json")
    rows = {r["layer"]: r for r in plan["rows"]}
    assert set(rows) == set(range(33)) and plan["vision_tokens"] == 576  # one 336px image: 24 x 24 patches
    assert rows[32]["saved_pct"] == 0 and rows[16]["flops"] < rows[32]["flops"]


def test_auto_layer_runs_the_search_then_evaluates_at_its_choice(overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("VTW_CACHE_DIR", str(tmp_path / "cache"))
    # eta so large that every candidate qualifies: the search must pick its first candidate, min_layer
    over = [*overrides, "vtw.layer=auto", "vtw.search.limit=2", "vtw.search.eta=1e9", "vtw.search.min_layer=2"]
    cfg = compose_config([*over, "logger=wandb", "logger.mode=offline", "compare_baseline=false"])
    outcome = run_job(cfg, JobContext(output_dir=tmp_path / "job"))
    res = read_json(tmp_path / "job" / "results.json")
    assert outcome.status == "ok" and res["layer_requested"] == "auto" and res["result"]["layer"] == 2
    searched = read_json(tmp_path / "job" / "layer_search.json")
    assert searched["layer"] == 2
    # the search is in the job's W&B run: chosen K and the KL-per-layer table equal layer_search.json
    (wb,) = find_offline_runs(tmp_path / "job" / "wandb")
    logged = read_offline_run(wb)
    assert logged.summary["layer_search/K"] == 2 and logged.summary["layer_search/eta"] == pytest.approx(1e9)
    assert logged.tables["layer_search"]["data"] == [
        [int(k), pytest.approx(v)] for k, v in sorted(searched["kl"].items(), key=lambda kv: int(kv[0]))
    ]
    # mode=search only searches (and reuses the cached search)
    cfg = compose_config([*over, "logger=none", "mode=search"])
    assert run_job(cfg, JobContext(output_dir=tmp_path / "search")).status == "ok"
    found = read_json(tmp_path / "search" / "layer_search.json")
    assert found["layer"] == 2 and found["reused_cache"] is True
    assert not (tmp_path / "search" / "results.json").exists()
