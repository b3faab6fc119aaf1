"""SLURM sweeps: ``launcher=slurm`` (hydra-submitit-launcher, blocking) and ``launcher=sbatch`` (the same submitit
launcher, not waiting: one array, a layer search before it, a summary job after it, returns at once).

The tests marked ``slurm`` run against a live cluster (``sinfo`` answers), e.g. the one-node cluster of
``scripts/slurm_cluster.sh start`` (CI starts it before pytest). Without one they skip and say so; with
``VTW_REQUIRE_SLURM=1`` (CI) they fail instead. The other tests run ``launcher=sbatch`` against a fake ``sbatch``
that records what it was asked to submit, and run the submitted jobs by hand (submitit's runner, as a SLURM task).

Jobs are kept small (1 CPU each, a few samples of the embedded default model and task).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hydra_plugins.vtw_launcher import checks
from hydra_plugins.vtw_launcher import sbatch as sb

ROOT = Path(__file__).resolve().parents[1]
WANDB_SYNC = ROOT / "slurm" / "wandb_sync.sh"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", **extra)
    # The jobs must find this venv's python first, whatever the caller's PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", _env())
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _kv(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if line.startswith("VTW_"))


# ---------------------------------------------------------------------------------------------------------------
# Without a cluster: the scripts' logic.


def _fake_sbatch(tmp_path: Path) -> tuple[Path, Path]:
    """An ``sbatch`` (with an ``srun``, and an ``sinfo`` listing a GPU partition) on PATH: each call's batch script is
    appended to the calls file as one JSON string; the job ids answered are 100, 101, ..."""
    bin_dir = _fake_sinfo(tmp_path, "debug*|(null)\ngpu|gpu:a100:4")
    calls = tmp_path / "sbatch_calls.jsonl"
    script = bin_dir / "sbatch"
    script.write_text(
        f"#!/bin/sh\nn=$(( $(cat {calls} 2>/dev/null | wc -l) + 100 ))\n"
        f"{sys.executable} -c 'import json, sys; print(json.dumps(open(sys.argv[-1]).read()))' \"$@\" >> {calls}\n"
        'echo "Submitted batch job $n"\n'
    )
    script.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    return bin_dir, calls


def _calls(calls: Path) -> list[str]:
    """The batch scripts submitted, in order."""
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.is_file() else []


def _opts(script: str) -> list[str]:
    """The ``#SBATCH`` options of a batch script."""
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def _fake_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = _env(**extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def _sbatch_sweep(args: list, env: dict, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run([sys.executable, ROOT / "run.py", "-m", "launcher=sbatch", *args], env=env, cwd=cwd, timeout=timeout)


CPU = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
       "hydra.launcher.timeout_min=10"]  # fmt: skip
#: the sweeps whose point vtw.layer=99 must fail in its own job (the failure paths of the launchers), not be refused
#: whole before anything runs by the sweep check (tests/test_pipeline_sweep.py)
NO_CHECK = "hydra.callbacks.sweep_check.enabled=false"


def test_sbatch_launcher_submits_search_array_and_summary_then_returns(small_job, tmp_path):
    """launcher=sbatch with vtw.layer=auto: a search array, the points' array after it (afterok), a summary job after
    that (afterany), every setting on the sbatch lines; the submitter returns without running or summarising."""
    bin_dir, calls = _fake_sbatch(tmp_path)
    sweep = tmp_path / "sw"
    r = _sbatch_sweep(
        ["vtw.layer=auto,3,5", *small_job, f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=gpu",
         "hydra.launcher.gpus_per_node=2", "hydra.launcher.cpus_per_task=3", "hydra.launcher.mem_gb=5",
         "hydra.launcher.timeout_min=60", "hydra.launcher.array_parallelism=2", "hydra.launcher.name=vtwtest",
         'hydra.launcher.setup=["module load cuda"]', "+hydra.launcher.additional_parameters.exclude=n7"],
        _fake_env(bin_dir),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = sb.read_plan(sweep)
    # Hydra's own job dirs: ${hydra.job.num}_<model>_<dataset>_<K tag> (conf/config.yaml's hydra.sweep.subdir)
    assert [p["dir"] for p in plan["points"]] == [
        "0_tiny-llava_synthvqa_auto", "1_tiny-llava_synthvqa_K3", "2_tiny-llava_synthvqa_K5"
    ]  # fmt: skip
    assert [p["overrides"][:2] for p in plan["points"]] == [
        ["launcher=sbatch", f"vtw.layer={k}"] for k in ("auto", 3, 5)
    ]
    assert [s["dir"] for s in plan["searches"]] == [".search/0"]
    assert plan["searches"][0]["overrides"] == [*plan["points"][0]["overrides"], "mode=search"]
    sub = sweep / ".sbatch" / "0"
    search, array, summary = map(_opts, _calls(calls))
    # one search (one point has vtw.layer=auto): one job, not an array
    assert "--job-name=vtwtest-search" in search and not any(o.startswith("--array") for o in search)
    assert f"--output={sweep}/logs/search_%j.out" in search and "--requeue" in search
    for opt in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=3", "--mem=5GB", "--time=60", "--requeue",
                "--array=0-2%2", "--dependency=afterok:100", "--kill-on-invalid-dep=yes", "--exclude=n7",
                "--job-name=vtwtest", f"--output={sweep}/logs/%A_%a.out"):  # fmt: skip
        assert opt in array, (opt, array)
    assert "--dependency=afterany:101" in summary and "--partition=gpu" in summary
    assert "--job-name=vtwtest-summary" in summary and "--cpus-per-task=1" in summary
    assert not any(o.startswith(("--gpus", "--array", "--requeue", "--mem")) for o in summary)
    task = _calls(calls)[1]
    assert "module load cuda" in task and f"{sys.executable} -u -m submitit.core._submit" in task
    assert _kv(r.stdout) == {"VTW_SWEEP_DIR": str(sweep), "VTW_SEARCH_JOB": "100", "VTW_ARRAY_JOB": "101",
                             "VTW_SUMMARY_JOB": "102"}  # fmt: skip
    # It returned at once: no job ran here, and the end-of-sweep callback left the summary to the summary job.
    assert not (sweep / "summary.csv").exists() and not any((sweep / p["dir"]).exists() for p in plan["points"])
    # Another sweep in the same directory is refused, before anything is submitted.
    again = _sbatch_sweep(["vtw.layer=1", *small_job, f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=gpu"],
                          _fake_env(bin_dir))  # fmt: skip
    assert again.returncode == 1 and "holds a sweep of 3 points, this one has 1" in again.stderr
    assert len(_calls(calls)) == 3 and sb.submissions(sweep) == [sub]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.launcher.timeout_min=soon", "timeout_min"),
        ("hydra.launcher.cpu=2", "cpu"),
        ("vtw.layer=interval(0,1)", "INTERVAL_SWEEP"),
    ],
)
def test_sbatch_launcher_rejects_bad_settings_before_submitting(small_job, tmp_path, override, message):
    bin_dir, calls = _fake_sbatch(tmp_path)
    r = _sbatch_sweep([override, *small_job, f"hydra.sweep.dir={tmp_path / 'sw'}"], _fake_env(bin_dir))
    assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]
    assert _calls(calls) == [] and not (tmp_path / "sw" / ".sbatch").exists()


def _task(sweep: Path, job_id: str) -> subprocess.CompletedProcess:
    """Run the submitted job ``job_id`` (``ARRAY_TASK`` for an array task) as its batch script would: submitit's
    runner with SLURM's job variables."""
    array, _, task = job_id.partition("_")
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": array, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    if task:
        slurm.update(SLURM_ARRAY_JOB_ID=array, SLURM_ARRAY_TASK_ID=task)
    cmd = [sys.executable, "-u", "-m", "submitit.core._submit", f"{sweep}/.submitit/%j"]
    return _run(cmd, env=_env(**slurm), cwd=ROOT, timeout=240)


def test_sbatch_task_runs_its_point_and_a_resubmission_runs_only_the_unfinished(small_job, tmp_path):
    """Each task runs its point through Hydra in its own dir; the summary job writes status.tsv; the same command with
    resume=true submits only the points without results (array task k: the k-th of them), into the same dirs."""
    bin_dir, calls = _fake_sbatch(tmp_path)
    sweep = tmp_path / "sw"
    args = ["vtw.layer=null,1,99", *small_job, f"resume_root={tmp_path}", f"hydra.sweep.dir={sweep}", *CPU, NO_CHECK]
    assert _sbatch_sweep(args, _fake_env(bin_dir)).returncode == 0
    dirs = [sweep / p["dir"] for p in sb.read_plan(sweep)["points"]]
    r = _task(sweep, "100_1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = _job(dirs[1])
    assert (job["status"], job["job_num"], job["slurm_job_id"], job["layer"]) == ("ok", 1, "100", 1)
    assert json.loads((dirs[1] / "results.json").read_text())["config"]["vtw"]["layer"] == 1
    assert (dirs[1] / ".hydra" / "overrides.yaml").is_file()  # Hydra's own job set-up
    r = _task(sweep, "100_2")
    assert r.returncode == 1 and _job(dirs[2])["status"] == "failed" and "vtw.layer=99" in _job(dirs[2])["error"]
    # The summary job: every point's state, the summary of what finished; exit 1 (a point failed, one never ran).
    r = _task(sweep, "101")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert (sweep / "status.tsv").read_text().splitlines() == [
        "index\tstatus\tdir", f"0\tmissing\t{dirs[0].name}", f"1\tok\t{dirs[1].name}", f"2\tfailed\t{dirs[2].name}"
    ]  # fmt: skip
    assert [(row["job"], row["status"]) for row in _summary_rows(sweep)] == [
        (dirs[1].name, "ok"),
        (dirs[2].name, "failed"),
    ]
    done = (dirs[1] / "results.json").stat().st_mtime_ns
    # Resubmit: only points 0 and 2 go into the array (no search: no vtw.layer=auto); the directories are kept.
    r = _sbatch_sweep([*args, "resume=true"], _fake_env(bin_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    array, summary = map(_opts, _calls(calls)[2:])
    assert "--array=0-1%2" in array and "--dependency=afterany:102" in summary
    assert [p["dir"] for p in sb.read_plan(sweep)["points"]] == [d.name for d in dirs]
    assert sb.read_plan(sweep)["points"][0]["overrides"][-1] == "resume=True"  # as Hydra spells it
    assert (dirs[1] / "results.json").stat().st_mtime_ns == done
    # Everything finished: only the summary job is submitted.
    for d in (dirs[0], dirs[2]):
        shutil.copytree(dirs[1], d, dirs_exist_ok=True)
    assert _sbatch_sweep([*args, "resume=true"], _fake_env(bin_dir)).returncode == 0
    (last,) = map(_opts, _calls(calls)[4:])
    assert any(o.endswith("-summary") for o in last) and not any(o.startswith("--dependency") for o in last)
    assert [p.name for p in sb.submissions(sweep)] == ["0", "1", "2"]


def test_wandb_group_is_the_same_for_local_and_sbatch_sweeps(small_job, tmp_path):
    """The W&B group of a sweep's jobs comes from the sweep dir alone, whichever launcher ran them."""
    from wandb_offline import find_offline_runs, read_offline_run

    over = [o for o in small_job if o != "logger=none"] + ["logger=wandb", "logger.mode=offline", "vtw.layer=1"]
    local = tmp_path / "local" / "my sweeps" / "a,b~c"
    r = _run([sys.executable, ROOT / "run.py", "-m", *over, f"hydra.sweep.dir='{local}'"], cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    bin_dir, _ = _fake_sbatch(tmp_path)
    sweep = tmp_path / "sbatch" / "my sweeps" / "a,b~c"
    assert _sbatch_sweep([*over, f"hydra.sweep.dir='{sweep}'", *CPU], _fake_env(bin_dir)).returncode == 0
    assert _task(sweep, "100").returncode == 0
    groups = [read_offline_run(run).group for d in (local, sweep) for run in find_offline_runs(next(d.glob("0_*")))]
    assert groups == ["my_sweeps-a,b_c", "my_sweeps-a,b_c"]


# A minimal Hydra app: every job of a multirun appends its task overrides to jobs.jsonl (the independent reference).
_APP = textwrap.dedent(
    """
    import json, os
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg):
        with open(os.environ["JOBS_OUT"], "a") as f:
            f.write(json.dumps(list(HydraConfig.get().overrides.task)) + "\\n")

    if __name__ == "__main__":
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


@pytest.mark.parametrize(
    "spec",
    [
        ["vtw.layer=null,8,12", "limit=3"],
        ["vtw.layer=range(0,9,4)", "model=a,b", "name='p,q'"],
        ["vtw.layer=choice(2,auto)", "+extra=1,2", "limit=2"],
        ["model=glob(*)", "vtw.layer=3"],
    ],
)
def test_sbatch_points_are_the_jobs_of_hydras_multirun(hydra_app, tmp_path, spec):
    """The points launcher=sbatch writes are the jobs Hydra's basic launcher runs, in the same order."""
    out = tmp_path / "jobs.jsonl"
    env = {"JOBS_OUT": str(out), "PATH": "/usr/bin:/bin", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, hydra_app / "app.py", "-m", *spec]
    subprocess.run([*map(str, cmd), f"hydra.sweep.dir={tmp_path / 'local'}"], check=True, env=env, cwd=hydra_app)
    expected = [json.loads(line) for line in out.read_text().splitlines()]
    bin_dir, _ = _fake_sbatch(tmp_path)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    r = _run([*cmd, "hydra/launcher=sbatch", "hydra.launcher.gpus_per_node=null", f"hydra.sweep.dir={tmp_path / 'sb'}"],
             env=env, cwd=hydra_app)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p["overrides"] for p in sb.read_plan(tmp_path / "sb")["points"]] == expected
    assert len(expected) > 1


def test_wandb_sync_uploads_only_unsynced_offline_runs(tmp_path):
    runs = {}
    for job, run_id, synced in [("0-a", "aaa", False), ("1-b", "bbb", True), ("2-c", "ccc", False)]:
        d = tmp_path / "sweep" / job / "wandb" / f"offline-run-20250101_000000-{run_id}"
        d.mkdir(parents=True)
        (d / f"run-{run_id}.wandb").write_bytes(b"x")
        if synced:
            (d / f"run-{run_id}.wandb.synced").write_text("")
        runs[run_id] = d
    (tmp_path / "sweep" / "3-d" / "wandb" / "run-20250101_000000-ddd").mkdir(parents=True)  # an online run
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "wandb_calls.txt"
    (bindir / "wandb").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    (bindir / "wandb").chmod(0o755)
    env = _env()
    env["PATH"] = f"{bindir}:{env['PATH']}"
    r = _run([WANDB_SYNC, "--project", "p", tmp_path / "sweep"], env=env)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == ["sync", "--project", "p", str(runs["aaa"]), str(runs["ccc"])]
    log.unlink()
    r = _run([WANDB_SYNC, "--dry-run", tmp_path / "sweep"], env=env)
    assert r.returncode == 0 and str(runs["aaa"]) in r.stderr and not log.exists()


# ---------------------------------------------------------------------------------------------------------------
# Against a live cluster.


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster answers."""
    if not all(shutil.which(c) for c in ("sinfo", "sbatch", "scontrol", "squeue", "scancel")):
        return "no SLURM client here (sinfo/sbatch/scontrol/squeue/scancel not on PATH)"
    try:
        # `scontrol ping` answers at once; sinfo retries for about 10 s when no controller runs.
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            said = (ping.stdout + ping.stderr).strip().splitlines() or [f"scontrol ping exited {ping.returncode}"]
            return f"no SLURM controller answers: {said[0]}"
        r = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip() or r.stdout.strip()}"
    if not any(line.split()[:1] == ["up"] and not line.split()[1].startswith(("down", "drain", "fail"))
               for line in r.stdout.splitlines() if len(line.split()) == 2):  # fmt: skip
        return f"no partition with a usable node: sinfo says {r.stdout.strip()!r}"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    message = f"{problem}; start a one-node test cluster with `sudo scripts/slurm_cluster.sh start`"
    if os.environ.get("VTW_REQUIRE_SLURM") == "1":
        pytest.fail(f"VTW_REQUIRE_SLURM=1 but {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def small_job(tmp_path_factory) -> list[str]:
    """Overrides for a job of a few seconds: the embedded default model and task when shipped, else tiny fixtures."""
    common = ["dataset.limit=2", "logger=none", "progress=false"]
    if (ROOT / "vtw" / "assets" / "tiny-llava").is_dir():
        return common
    sys.path.insert(0, str(Path(__file__).parent))
    from test_lmms_fixtures import build_tiny_llava, build_tiny_tasks

    root = tmp_path_factory.mktemp("slurm_fixtures")
    model = build_tiny_llava(root / "model")
    tasks = build_tiny_tasks(root / "tasks")
    return [f"model.pretrained={model}", f"dataset.tasks=[{tasks['gen']}]", f"dataset.include_path=[{root / 'tasks'}]",
            *common]  # fmt: skip


def _squeue(*job_ids: str) -> list[str] | None:
    """Queue lines of the jobs still pending/running; None when squeue itself failed (controller busy), so a
    transient error is never read as "all jobs done"."""
    r = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return r.stdout.split("\n") if r.stdout.strip() else []


def _wait_gone(job_ids: list[str], timeout: float, what: str, sweep_dir: Path) -> None:
    """Wait until none of the jobs is pending or running; on timeout cancel them and show the states last seen and
    the logs."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        seen = _squeue(*job_ids)
        if seen == []:
            return
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((sweep_dir / "logs").glob("*.out")))
    pytest.fail(f"{what}: jobs {job_ids} still queued after {timeout:.0f} s, last seen {seen}\n{logs}")


def _job_fields(job: str) -> dict[str, str]:
    """``scontrol show job``'s ``Key=Value`` fields of one job (``{}`` when the controller does not answer)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv) if r.returncode == 0 else {}


def _state(fields: dict[str, str]) -> str:
    return " ".join(f"{k}={fields.get(k)}" for k in ("JobState", "Reason", "Restarts", "BeginTime", "ExitCode"))


def _wait_job(job: str, until, timeout: float, what: str) -> dict[str, str]:
    """Poll ``scontrol show job`` until ``until(fields)`` holds; fail naming the state last seen at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        fields = _job_fields(job)
        if fields and until(fields):
            return fields
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: job {job} after {timeout:.0f} s: {_state(fields) if fields else 'no answer'}")
        time.sleep(0.3)


def _job(d: Path) -> dict:
    return json.loads((d / "job.json").read_text())


def _summary_rows(sweep_dir: Path) -> list[dict]:
    import csv

    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _ids(sweep_dir: Path) -> tuple[set, set]:
    """(SLURM array job ids, array task ids) recorded in the job.json files under sweep_dir."""
    jobs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/job.json")]
    return {j.get("slurm_job_id") for j in jobs}, {j.get("slurm_array_task_id") for j in jobs}


def _slurm_sweep(tmp_path: Path, sweep: Path, *args: str) -> subprocess.CompletedProcess:
    """``run.py -m launcher=slurm`` with small jobs (1 CPU, 1 GiB, no GPU) into ``sweep``; its jobs are cancelled
    when it returns (or times out)."""
    name = f"vtwtest-{os.getpid()}-{sweep.parent.name}"
    cmd = [
        sys.executable, ROOT / "run.py", "-m", "launcher=slurm", *args,
        f"resume_root={tmp_path}", f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10",
    ]  # fmt: skip
    try:
        return _run(cmd, cwd=ROOT, timeout=240)
    finally:
        subprocess.run(["scancel", f"--name={name}"])


@pytest.mark.slurm
def test_launcher_slurm_runs_the_sweep_as_one_array(cluster, small_job, tmp_path):
    """`python run.py -m launcher=slurm`: one array of 4 tasks; 3 results, the failing point marked in the summary."""
    sweep = tmp_path / "multirun"
    r = _slurm_sweep(
        tmp_path, sweep, "vtw.layer=null,1,2,99", *small_job, "hydra.launcher.array_parallelism=2", NO_CHECK
    )
    # The sweep's summary step runs after every job returned, and exits 1 because one job failed.
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 of 4 jobs failed" in r.stdout + r.stderr
    job_dirs = sorted((p for p in sweep.iterdir() if (p / "job.json").is_file()), key=lambda p: _job(p)["job_num"])
    assert len(job_dirs) == 4
    statuses = [_job(d)["status"] for d in job_dirs]
    assert statuses == ["ok", "ok", "ok", "failed"]
    assert [json.loads((d / "results.json").read_text())["config"]["vtw"]["layer"] for d in job_dirs[:3]] == [
        None,
        1,
        2,
    ]
    assert not (job_dirs[3] / "results.json").exists()
    # One array: every job ran under the same SLURM array job id, as tasks 0..3.
    array_ids, task_ids = _ids(sweep)
    assert len(array_ids) == 1 and None not in array_ids
    assert task_ids == {"0", "1", "2", "3"}
    rows = {Path(row["job_dir"]): row for row in _summary_rows(sweep)}
    assert [rows[d]["status"] for d in job_dirs] == ["ok", "ok", "ok", "failed"]
    assert "vtw.layer=99" in rows[job_dirs[3]]["error"]
    assert (sweep / "pareto.png").stat().st_size > 0


def _fake_sinfo(tmp_path: Path, stdout: str, code: int = 0) -> Path:
    """A `sinfo` on PATH that prints ``stdout`` and exits ``code``; returns its folder."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "sinfo"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{stdout}\nEOF\nexit {code}\n")
    script.chmod(0o755)
    return bin_dir


def test_gpu_check_reads_partitions_from_sinfo(tmp_path):
    """The launcher's GPU check from a hand-written `sinfo -o "%P|%G"` table: the default partition (starred) or the
    named ones; a GPU request on a partition without generic resources is the one-line error naming the setting."""
    sinfo = _fake_sinfo(tmp_path, "cpu*|(null)\ngpu|gpu:a100:4\ngpu|(null)\nmixed|(null)") / "sinfo"
    assert checks.partition_gres(None, str(sinfo)) == {"cpu": ["(null)"]}
    assert checks.partition_gres("gpu,mixed", str(sinfo)) == {"gpu": ["gpu:a100:4", "(null)"], "mixed": ["(null)"]}
    assert checks.partition_gres("nope", str(sinfo)) is None
    assert checks.partition_gres(None, str(_fake_sinfo(tmp_path, "", code=1) / "sinfo")) is None
    assert checks.partition_gres(None, str(tmp_path / "no-such-sinfo")) is None
    cpu = {"cpu": ["(null)"]}
    msg = checks.gpu_mismatch({"gpus_per_node": 1}, cpu)
    assert "'cpu' has no GPUs" in msg and "hydra.launcher.gpus_per_node=1 asks" in msg
    assert "add hydra.launcher.gpus_per_node=null" in msg and "\n" not in msg
    assert "additional_parameters.gres=gpu:1" in checks.gpu_mismatch({"additional_parameters": {"gres": "gpu:1"}}, cpu)
    assert checks.gpu_mismatch({"gpus_per_node": None}, cpu) is None  # a CPU job
    assert checks.gpu_mismatch({"gpus_per_node": 0, "gpus_per_task": None}, cpu) is None
    assert checks.gpu_mismatch({"gpus_per_node": 1}, {"gpu": ["gpu:a100:4", "(null)"]}) is None
    assert checks.gpu_mismatch({"gpus_per_node": 1}, None) is None  # sinfo could not tell: sbatch decides
    line = checks.sbatch_refusal("sbatch: error: Invalid generic resource (gres) specification\n")
    assert line.startswith("vtw: sbatch refused the sweep: sbatch: error: Invalid generic resource")
    assert "gpus_per_node=null" in line
    assert "gpus_per_node" not in checks.sbatch_refusal("sbatch: error: invalid partition specified: x")


def test_failed_submission_leaves_no_half_written_sweep(tmp_path):
    """What a failed launch wrote goes; what was there before stays; a dir left with only multirun.yaml goes."""
    old = tmp_path / "old"
    (old / "0_done").mkdir(parents=True)
    (old / "0_done" / "results.json").write_text("{}")
    (old / "multirun.yaml").write_text("old")
    before = checks.tree_of(old)
    (old / ".submitit").mkdir()
    (old / ".submitit" / "x.pkl").write_text("new")
    checks.undo_submission(old, before)
    assert checks.tree_of(old) == before
    new = tmp_path / "new"
    new.mkdir()
    (new / "multirun.yaml").write_text("sweeper")
    before = checks.tree_of(new)
    (new / ".submitit" / "1").mkdir(parents=True)
    (new / ".submitit" / "1" / "a.sh").write_text("new")
    checks.undo_submission(new, before)
    assert not new.exists()


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["slurm", "sbatch"])
@pytest.mark.parametrize("sinfo_answers", [True, False], ids=["checked-before-submit", "sbatch-refusal"])
def test_gpus_on_a_cpu_partition_is_one_line(cluster, small_job, tmp_path, sinfo_answers, launcher):
    """The default one GPU per task on the test cluster (no GRES): exit 1, one line naming
    hydra.launcher.gpus_per_node=null, no traceback, no sweep dir left. When sinfo does not answer, sbatch's own
    refusal is turned into the same kind of line. The same for launcher=slurm and launcher=sbatch."""
    sweep = tmp_path / "multirun"
    env = _env()
    if not sinfo_answers:
        env["PATH"] = f"{_fake_sinfo(tmp_path, '', code=1)}:{env['PATH']}"
    cmd = [sys.executable, ROOT / "run.py", "-m", f"launcher={launcher}", "vtw.layer=null,1", *small_job,
           f"hydra.sweep.dir={sweep}", f"hydra.launcher.name=vtwtest-{os.getpid()}", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1"]  # fmt: skip
    r = _run(cmd, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("vtw: ")]
    assert len(ours) == 1 and "hydra.launcher.gpus_per_node=null" in ours[0], r.stderr
    assert ("sbatch refused" in ours[0]) is (not sinfo_answers)
    assert not sweep.exists()
    assert (
        subprocess.run(["squeue", "-h", f"--name=vtwtest-{os.getpid()}"], capture_output=True, text=True).stdout == ""
    )


def _submit(args: list, env: dict | None = None) -> dict[str, str]:
    """``python run.py -m launcher=sbatch ARGS`` on the cluster (1 CPU per job); the VTW_* ids it prints."""
    r = _sbatch_sweep([*args, *CPU, f"hydra.launcher.name=vtwtest-{os.getpid()}"], env or _env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _kv(r.stdout)


@pytest.mark.slurm
def test_sbatch_array_cancel_resubmit_resumes_and_marks_failures(cluster, small_job, tmp_path):
    """launcher=sbatch: 4 points (one fails); cancel one task mid-run; resubmit; finished points are kept."""
    sweep = tmp_path / "sweep"
    # 99 is not a layer of the model: that point fails
    args = ["vtw.layer=null,1,2,99", *small_job, f"resume_root={tmp_path}", f"hydra.sweep.dir={sweep}",
            "hydra.launcher.array_parallelism=2", NO_CHECK]  # fmt: skip
    t0 = time.monotonic()
    ids = _submit(args)
    assert time.monotonic() - t0 < 60  # returned once queued
    array, summary = ids["VTW_ARRAY_JOB"], ids["VTW_SUMMARY_JOB"]
    plan = sb.read_plan(sweep)
    dirs = [sweep / p["dir"] for p in plan["points"]]
    names = ["0_tiny-llava_synthvqa_base", "1_tiny-llava_synthvqa_K1", "2_tiny-llava_synthvqa_K2",
             "3_tiny-llava_synthvqa_K99"]  # fmt: skip
    assert [d.name for d in dirs] == names
    try:
        # Cancel point 2 while its python runs (it starts once point 0 or 1 has finished: array_parallelism=2).
        _wait_job(f"{array}_2", lambda f: (dirs[2] / "job.json").is_file() and _job(dirs[2])["status"] == "running",
                  180, "point 2's python running")  # fmt: skip
        assert subprocess.run(["scancel", f"{array}_2"]).returncode == 0
        _wait_gone([array, summary], 180, "first submission", sweep)
    finally:
        subprocess.run(["scancel", array, summary])
    assert [s for _, s, _ in sb.point_states(sweep, plan)] == ["ok", "ok", "running", "failed"]
    # The summary job ran after the array and marks the failed point (and the cancelled one as unfinished).
    rows = {row["job"]: row["status"] for row in _summary_rows(sweep)}
    assert rows == dict(zip(names, ["ok", "ok", "running", "failed"]))
    assert (sweep / "status.tsv").read_text().splitlines()[1:] == [
        f"{i}\t{s}\t{n}" for i, (s, n) in enumerate(zip(["ok", "ok", "running", "failed"], names))
    ]
    # Per-task logs, one file per array task.
    assert sorted(p.name for p in (sweep / "logs").glob(f"{array}_*.out")) == [f"{array}_{i}.out" for i in range(4)]
    assert "CANCELLED" in (sweep / "logs" / f"{array}_2.out").read_text()
    before = {i: ((dirs[i] / "job.json").read_bytes(), (dirs[i] / "results.json").stat().st_mtime_ns) for i in (0, 1)}

    # Resubmit (the same command, resume=true): only the points without results run again, in the same directories.
    ids = _submit([*args, "resume=true"])
    array2, summary2 = ids["VTW_ARRAY_JOB"], ids["VTW_SUMMARY_JOB"]
    try:
        _wait_gone([array2, summary2], 180, "resubmission", sweep)
    finally:
        subprocess.run(["scancel", array2, summary2])
    # array task k runs the k-th point still to run (here 2 and 3)
    assert sorted(p.name for p in (sweep / "logs").glob(f"{array2}_*.out")) == [f"{array2}_0.out", f"{array2}_1.out"]
    after = {i: ((dirs[i] / "job.json").read_bytes(), (dirs[i] / "results.json").stat().st_mtime_ns) for i in (0, 1)}
    assert after == before  # not redone, not even touched
    assert _job(dirs[2])["status"] == "ok" and _job(dirs[2])["slurm_job_id"] == array2
    assert json.loads((dirs[2] / "results.json").read_text())["config"]["vtw"]["layer"] == 2
    assert _job(dirs[3])["status"] == "failed" and "vtw.layer=99" in _job(dirs[3])["error"]
    rows = {row["job"]: row["status"] for row in _summary_rows(sweep)}
    assert rows == dict(zip(names, ["ok", "ok", "ok", "failed"]))
    assert [line.split()[3::2] for line in (sweep / "submissions.log").read_text().splitlines()] == [
        [f"array={array}", "summary=" + summary], [f"array={array2}", "summary=" + summary2]
    ]  # fmt: skip


# A Hydra app run with launcher=sbatch whose job records each start in its job dir; the first start of job 1 runs
# long (it gets requeued).
_REQUEUE_APP = textwrap.dedent(
    """
    import os, time, pathlib
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg):
        hc = HydraConfig.get()
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(pathlib.Path(hc.runtime.output_dir) / "starts.txt", "a") as f:
            f.write(os.environ["SLURM_ARRAY_TASK_ID"] + " " + restart + "\\n")
        if hc.job.num == 1 and restart == "0":
            time.sleep(120)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slurm
def test_requeued_task_runs_again_in_the_same_dir(cluster, tmp_path):
    """A task SLURM requeues (node failure, preemption, `scontrol requeue`) restarts in its own dir and log."""
    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "app.py").write_text(_REQUEUE_APP)
    (app / "conf" / "config.yaml").write_text(
        "defaults:\n  - override hydra/launcher: sbatch\n  - _self_\nlayer: 1\n"
        "hydra:\n  sweep:\n    subdir: ${hydra.job.num}_layer=${layer}\n"
    )
    sweep = tmp_path / "sweep"
    name = f"vtwtest-{os.getpid()}"
    env = _env(PYTHONPATH=str(ROOT))
    r = _run([sys.executable, app / "app.py", "-m", "layer=1,2", f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}",
              *CPU], env=env, cwd=app, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    array = _kv(r.stdout)["VTW_ARRAY_JOB"]
    task, starts = f"{array}_1", sweep / "1_layer=2" / "starts.txt"
    try:
        _wait_job(task, lambda f: f["JobState"] == "RUNNING" and starts.is_file(), 120, "task 1's first start")
        assert subprocess.run(["scontrol", "requeue", task]).returncode == 0
        requeued_at = time.time()  # the controller revoked the killed run's credential before this
        # SLURM holds a requeued job back (BeginTime about two minutes ahead) because the node refuses a credential
        # issued in the same second as the one it revoked for the killed run ("Job credential revoked": the task then
        # ends FAILED without starting). Release it once it is pending again and that second is over.
        _wait_job(task, lambda f: f["JobState"] == "PENDING" and time.time() >= int(requeued_at) + 2, 60,
                  "task 1 pending again after the requeue")  # fmt: skip
        # The release is repeated while the task is still pending: slurmctld may set the hold after a release.
        released = 0.0

        def restarted(fields: dict[str, str]) -> bool:
            nonlocal released
            if fields["JobState"] == "PENDING" and time.monotonic() - released > 5:
                _run(["scontrol", "update", f"JobId={task}", "StartTime=now"])
                released = time.monotonic()
            assert fields["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED"), _state(fields)
            return starts.read_text().count("\n") >= 2

        _wait_job(task, restarted, 150, "task 1's second start")
        _wait_gone([array], 60, "requeued array", sweep)
        state = _state(_job_fields(task))
    finally:
        subprocess.run(["scancel", f"--name={name}"])
    assert (sweep / "0_layer=1" / "starts.txt").read_text() == "0 0\n"
    log = (sweep / "logs" / f"{array}_1.out").read_text()  # one log, appended to by the second start
    assert starts.read_text() == "1 0\n1 1\n", log + state
    assert "restart=0" in log and "DUE TO JOB REQUEUE" in log and "restart=1" in log


def test_launcher_slurm_local_runs_the_sweep_through_submitit_without_slurm(small_job, tmp_path):
    """launcher=slurm_local: the same submitit flow on one machine, every job in its own process and dir."""
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, ROOT / "run.py", "-m", "launcher=slurm_local", "vtw.layer=null,1", *small_job,
           f"resume_root={tmp_path}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    r = _run(cmd, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = sorted((_job(p.parent) for p in sweep.glob("*/job.json")), key=lambda j: j["job_num"])
    assert [j["status"] for j in jobs] == ["ok", "ok"]
    assert [j["layer"] for j in jobs] == [None, 1]
    # submitit ran each job as its own local process (not the submitter) and kept its result under .submitit/.
    assert len({j["pid"] for j in jobs}) == 2
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2
    assert [row["status"] for row in _summary_rows(sweep)] == ["ok", "ok"]


@pytest.mark.slurm
def test_layer_search_runs_first_and_the_array_tasks_share_its_cache(cluster, small_job, tmp_path):
    """vtw.layer=auto: the search job runs before the array (afterok); every task reuses its cached layer."""
    sweep = tmp_path / "sweep"
    env = _env(VTW_CACHE_DIR=str(tmp_path / "cache"))  # exported to the jobs by sbatch
    job = [o for o in small_job if not o.startswith("dataset.limit=")]
    ids = _submit(["vtw.layer=auto", "vtw.search.limit=2", *job, "dataset.limit=1,2", f"resume_root={tmp_path}",
                   f"hydra.sweep.dir={sweep}"], env)  # fmt: skip
    jobs = [ids["VTW_SEARCH_JOB"], ids["VTW_ARRAY_JOB"], ids["VTW_SUMMARY_JOB"]]
    assert all(jobs)
    try:
        _wait_gone(jobs, 240, "search + array + summary", sweep)
    finally:
        subprocess.run(["scancel", *jobs])
    plan = sb.read_plan(sweep)
    assert len(plan["points"]) == 2 and len(plan["searches"]) == 2  # dataset.limit differs: one search job per point
    searches = [sweep / ".search" / str(i) for i in range(2)]
    points = [sweep / p["dir"] for p in plan["points"]]
    assert [_job(d)["status"] for d in searches + points] == ["ok"] * 4
    # The array started only after both search jobs had finished.
    assert min(_job(d)["started"] for d in points) >= max(_job(d)["finished"] for d in searches)
    # One search computed the layer; the other search job and both array tasks read it from the cache.
    found = [json.loads((d / "layer_search.json").read_text()) for d in searches + points]
    assert sorted(f["reused_cache"] for f in found) == [False, True, True, True]
    assert len({f["cache_key"] for f in found}) == 1
    layer = found[0]["layer"]
    assert [json.loads((d / "results.json").read_text())["result"]["layer"] for d in points] == [layer, layer]
    assert [row["status"] for row in _summary_rows(sweep)] == ["ok", "ok"]


@pytest.mark.slurm
def test_one_array_task_with_two_processes_splits_the_documents(cluster, small_job, tmp_path):
    """`hydra.launcher.tasks_per_node=2`: one point, two SLURM tasks (submitit's distributed environment, gloo on
    the CPU) that split the documents; rank 0 writes the results of every document once, rank 1 its status only."""
    sweep = tmp_path / "multirun"
    job = [o for o in small_job if not o.startswith("dataset.limit=")]
    r = _slurm_sweep(tmp_path, sweep, "vtw.layer=1", "dataset.limit=5", *job, "device=cpu",
                     "hydra.launcher.tasks_per_node=2")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (job_dir,) = [p.parent for p in sweep.glob("*/job.json")]
    res = json.loads((job_dir / "results.json").read_text())
    assert res["job"]["processes"] == 2 and res["result"]["num_samples"] == 5
    samples = [json.loads(line) for line in (job_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(5))
    assert _job(job_dir)["status"] == "ok" and json.loads((job_dir / "job.rank1.json").read_text())["status"] == "ok"
