"""Sweep specs: expansion must equal the jobs Hydra's own multirun launches; plan files, statuses, dirnames."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vtw.pipeline import sweepspec as ss

# A minimal Hydra app: every job of a multirun appends its task overrides to jobs.jsonl (the independent reference).
_APP = textwrap.dedent(
    """
    import json, os, sys
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg):
        with open(os.environ["JOBS_OUT"], "a") as f:
            f.write(json.dumps(list(HydraConfig.get().overrides.task)) + "\\n")

    main()
    """
)


@pytest.fixture(scope="module")
def hydra_app(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app")
    (root / "app.py").write_text(_APP)
    conf = root / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults:\n  - model: a\n  - _self_\nvtw:\n  layer: null\nlimit: 5\nname: x\n")
    for m in ("a", "b", "c2"):
        (conf / "model" / f"{m}.yaml").write_text(f"name: {m}\n")
    return root


def hydra_multirun_jobs(app: Path, overrides: list[str], tmp_path: Path) -> list[list[str]]:
    """The task overrides of every job ``python app.py -m OVERRIDES`` runs, in launch order."""
    out = tmp_path / "jobs.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(app / "app.py"), "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = {"JOBS_OUT": str(out), "PATH": "/usr/bin:/bin", "HYDRA_FULL_ERROR": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=app)
    return [
        [o for o in json.loads(line) if not o.startswith("hydra.sweep.dir=")] for line in out.read_text().splitlines()
    ]


@pytest.mark.parametrize(
    "spec",
    [
        ["vtw.layer=null,8,12", "limit=3"],
        ["vtw.layer=range(0,9,4)", "model=a,b", "name='p,q'"],
        ["vtw.layer=choice(2,auto)", "+extra=1,2", "limit=2"],
        ["model=glob(*)", "vtw.layer=3"],
    ],
)
def test_expansion_matches_hydra_multirun(hydra_app, tmp_path, spec):
    expected = hydra_multirun_jobs(hydra_app, spec, tmp_path)
    got = ss.expand_overrides(spec, config_dir=hydra_app / "conf")
    assert got == expected
    assert len(got) > 1


def test_hand_derived_points():
    plan = ss.plan_sweep(["vtw.layer=null,8", "limit=range(1,3)", "model=tiny-llava"])
    assert [list(p.overrides) for p in plan.points] == [
        ["vtw.layer=null", "limit=1", "model=tiny-llava"],
        ["vtw.layer=null", "limit=2", "model=tiny-llava"],
        ["vtw.layer=8", "limit=1", "model=tiny-llava"],
        ["vtw.layer=8", "limit=2", "model=tiny-llava"],
    ]
    assert [p.index for p in plan.points] == [0, 1, 2, 3]
    # Only the varying keys name the directory; the index keeps names unique.
    assert [p.dirname for p in plan.points] == [
        "0_vtw.layer=null,limit=1",
        "1_vtw.layer=null,limit=2",
        "2_vtw.layer=8,limit=1",
        "3_vtw.layer=8,limit=2",
    ]
    assert plan.search == ()
    defaults = ("resume=true", "compare_baseline=false")
    assert ss.plan_sweep([]).points == (ss.SweepPoint(0, (), "0", defaults),)
    # Every job resumes and computes its own K only, unless the spec decides about these itself.
    assert plan.points[0].run == (*plan.points[0].overrides, *defaults)
    assert ss.plan_sweep(["+resume=false", "a=1,2"]).points[1].run == ("+resume=False", "a=2", "compare_baseline=false")


def test_dirnames_safe_unique_and_bounded():
    plan = ss.plan_sweep(["model.pretrained=/tmp/a b,/tmp/c", "prompt='x y'"])
    assert [p.dirname for p in plan.points] == ["0_model.pretrained=_tmp_a_b", "1_model.pretrained=_tmp_c"]
    long_values = ",".join("v" * 80 + str(i) for i in range(3))
    names = [p.dirname for p in ss.plan_sweep([f"name={long_values}"]).points]
    assert len(set(names)) == 3 and all(len(n) <= 120 and "/" not in n for n in names)


def test_wandb_group_of_the_sweep_dir(tmp_path):
    sweep = tmp_path / "sweeps" / "2025-01-01_12-00-00"
    assert ss.wandb_group(sweep) == "sweeps-2025-01-01_12-00-00"
    plan = ss.plan_sweep(["vtw.layer=1,2"], group=ss.wandb_group(sweep))
    assert plan.points[1].run == ("vtw.layer=2", "resume=true", "compare_baseline=false",
                                  "++logger.group='sweeps-2025-01-01_12-00-00'")  # fmt: skip
    # The spec's own group wins.
    assert ss.plan_sweep(["logger.group=mine"], group="g").points[0].run[-1] == "compare_baseline=false"


def test_layer_searches_one_per_distinct_auto_point():
    plan = ss.plan_sweep(["vtw.layer=auto,4", "model=a,b", "limit=2"])
    assert [list(s) for s in plan.search] == [
        ["vtw.layer=auto", "model=a", "limit=2", "mode=search", "resume=true", "compare_baseline=false"],
        ["vtw.layer=auto", "model=b", "limit=2", "mode=search", "resume=true", "compare_baseline=false"],
    ]
    # A spec that sets the mode gets mode=search in its search jobs.
    (search,) = ss.plan_sweep(["vtw.layer=auto", "mode=eval"]).search
    assert search[:2] == ("vtw.layer=auto", "mode=search")


def test_tokenize_spec():
    text = """
    # layers to try
    vtw.layer=null,8,12   model=tiny-llava  # inline comment
    prompt='a b # not a comment' x="c,d"
    esc=a\\ b
    """
    assert ss.tokenize_spec(text) == [
        "vtw.layer=null,8,12",
        "model=tiny-llava",
        "prompt='a b # not a comment'",
        'x="c,d"',
        "esc=a\\ b",
    ]
    with pytest.raises(ValueError, match="line 1: unterminated ' quote"):
        ss.tokenize_spec("prompt='abc")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (["x=interval(0,1)"], "INTERVAL_SWEEP sweep; only enumerable"),
        (["model=glob(*)"], "glob sweep; it needs the config dir"),
        (["hydra.run.dir=/x"], "sets hydra.run.dir"),
        (["x=[1,"], "Hydra cannot parse"),
        (["-m", "x=1"], "'-m' is a command-line flag"),
    ],
)
def test_bad_specs_are_value_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        ss.plan_sweep(spec)


def test_plan_roundtrip_status_and_pending(tmp_path):
    plan = ss.plan_sweep(["vtw.layer=1,2,3,4,5"])
    ss.write_plan(tmp_path / ss.PLAN_FILE, plan)
    assert ss.read_plan(tmp_path) == plan
    d = {p.index: tmp_path / p.dirname for p in plan.points}
    # 0: ok; 1: failed; 2: started, never finished; 3: job.json ok but results missing; 4: never started
    for i, status in [(0, "ok"), (1, "failed"), (2, "running"), (3, "ok")]:
        d[i].mkdir()
        (d[i] / "job.json").write_text(json.dumps({"status": status}))
    (d[0] / "results.json").write_text("{}")
    assert [ss.point_status(tmp_path, p) for p in plan.points] == ["ok", "failed", "running", "running", "missing"]
    # Resumed from an identical finished job: its results were copied in, so the point is done.
    (d[3] / "job.json").write_text(json.dumps({"status": "skipped"}))
    (d[3] / "results.json").write_text("{}")
    assert ss.point_status(tmp_path, plan.points[3]) == "ok"
    (d[3] / "results.json").unlink()
    assert ss.pending_indices(tmp_path) == [1, 2, 3, 4]
    assert ss.format_indices(ss.pending_indices(tmp_path)) == "1-4"
    assert ss.status_table(tmp_path).splitlines()[1:3] == ["0\tok\t0_vtw.layer=1", "1\tfailed\t1_vtw.layer=2"]
    with pytest.raises(ValueError, match="not a sweep submitted"):
        ss.read_plan(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "spec": [], "points": [{"index": 0}], "search": []}))
    with pytest.raises(ValueError, match="not a valid sweep plan: KeyError"):
        ss.read_plan(tmp_path / "bad.json")


def test_format_indices():
    assert ss.format_indices([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert ss.format_indices([3]) == "3"
    assert ss.format_indices([]) == ""


def test_cli_expand_writes_plan(tmp_path):
    spec = tmp_path / "spec.txt"
    spec.write_text("vtw.layer=null,8  # two points\n")
    out = tmp_path / "sweep" / "sweep.json"
    r = subprocess.run(
        [sys.executable, "-m", "vtw.pipeline.sweepspec", "expand", "--spec", str(spec), "--out", str(out), "limit=2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "2 points, 0 layer searches" in r.stdout
    assert [list(p.overrides) for p in ss.read_plan(out).points] == [
        ["vtw.layer=null", "limit=2"],
        ["vtw.layer=8", "limit=2"],
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "vtw.pipeline.sweepspec", "expand", "x=interval(0,1)"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "only enumerable sweeps" in bad.stderr
