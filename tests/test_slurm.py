"""SLURM sweeps: ``launcher=slurm`` (hydra-submitit-launcher) and the plain-sbatch flow in ``slurm/``.

The tests marked ``slurm`` run against a live cluster (``sinfo`` answers), e.g. the one-node cluster of
``scripts/slurm_cluster.sh start`` (CI starts it before pytest). Without one they skip and say so; with
``VTW_REQUIRE_SLURM=1`` (CI) they fail instead. The other tests check the scripts without a cluster.

Jobs are kept small (1 CPU each, a few samples of the embedded default model and task).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_plugins.vtw_launcher import slurm as launcher
from vtw.pipeline import sweepspec as ss

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "slurm" / "submit_sweep.sh"
SWEEP_SBATCH = ROOT / "slurm" / "sweep.sbatch"
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


def test_submit_dry_run_builds_the_array_search_and_summary_jobs(tmp_path):
    sweep = tmp_path / "sw"
    r = _run(
        [SUBMIT, "--dry-run", "--sweep-dir", sweep, "--partition", "gpu", "--gpus", "2", "--cpus-per-task", "3",
         "--mem", "5G", "--time", "1:00:00", "--parallel", "2", "--setup", "module load cuda",
         "--sbatch-arg=--exclude=n7", "vtw.layer=auto,3,5", "dataset.limit=2"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = ss.read_plan(sweep)
    assert [p.dirname for p in plan.points] == ["0_vtw.layer=auto", "1_vtw.layer=3", "2_vtw.layer=5"]
    cmds = [shlex.split(line) for line in r.stderr.splitlines() if line.startswith("sbatch ")]
    assert len(cmds) == 3  # layer search, sweep array, summary
    search, array, summary = cmds
    assert "--array=0-0" in search and "--job-name=vtw-sweep-search" in search
    assert f"--export=ALL,VTW_SWEEP_DIR={sweep},VTW_SWEEP_STAGE=search" in search
    for opt in ("--partition=gpu", "--gres=gpu:2", "--cpus-per-task=3", "--mem=5G", "--time=1:00:00", "--requeue",
                "--array=0-2%2", "--dependency=afterok:DRYRUN", "--kill-on-invalid-dep=yes", "--exclude=n7",
                f"--output={sweep}/logs/%A_%a.out", f"--export=ALL,VTW_SWEEP_DIR={sweep}"):  # fmt: skip
        assert opt in array, (opt, array)
    assert array[-1] == str(SWEEP_SBATCH)
    assert "--dependency=afterany:DRYRUN" in summary and "--gres=gpu:2" not in summary
    assert summary[-1].endswith("slurm/summary.sbatch")
    setup = (sweep / "setup.sh").read_text()
    assert f"cd {ROOT}" in setup and "module load cuda" in setup
    # A second submission of the same dir must not take a new spec.
    again = _run([SUBMIT, "--dry-run", "--sweep-dir", sweep, "vtw.layer=1"])
    assert again.returncode != 0 and "already holds a sweep" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "x"], "--gpus must be a non-negative integer, got 'x'"),
        (["--time", "soon"], "--time must be minutes or [D-]HH:MM:SS, got 'soon'"),
        (["--only", "1;2"], "--only must look like 1,3-4"),
        (["--bogus"], "unknown option --bogus"),
        (["x=interval(0,1)"], "only enumerable sweeps"),
    ],
)
def test_submit_rejects_bad_input(tmp_path, args, message):
    r = _run([SUBMIT, "--dry-run", "--sweep-dir", tmp_path / "sw", *args])
    assert r.returncode == 2
    assert message in r.stderr


def _fake_project(tmp_path: Path, plan_spec: list[str]) -> tuple[Path, Path]:
    """A sweep dir whose setup.sh cds into a project whose run.py records its argv (and writes results)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "run.py").write_text(
        "import json, sys, pathlib\npathlib.Path('argv.json').write_text(json.dumps(sys.argv[1:]))\n"
    )
    sweep = tmp_path / "sweep"
    ss.write_plan(sweep / ss.PLAN_FILE, ss.plan_sweep(plan_spec))
    (sweep / "setup.sh").write_text(f"cd {proj}\n")
    return proj, sweep


def test_sweep_task_runs_its_point_in_its_own_dir(tmp_path):
    proj, sweep = _fake_project(tmp_path, ["vtw.layer=auto,2", "dataset.limit=3", "prompt='a,b'"])
    env = _env(VTW_SWEEP_DIR=str(sweep), SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77")
    r = _run(["bash", SWEEP_SBATCH], env=env)
    assert r.returncode == 0, r.stderr
    argv = json.loads((proj / "argv.json").read_text())
    assert argv == ["vtw.layer=2", "dataset.limit=3", "prompt='a,b'", "resume=true", "compare_baseline=false",
                    f"hydra.run.dir='{sweep}/1_vtw.layer=2'"]  # fmt: skip
    # The layer search stage runs the search job of the plan in its own dir.
    env.update(VTW_SWEEP_STAGE="search", SLURM_ARRAY_TASK_ID="0")
    assert _run(["bash", SWEEP_SBATCH], env=env).returncode == 0
    argv = json.loads((proj / "argv.json").read_text())
    assert argv == ["vtw.layer=auto", "dataset.limit=3", "prompt='a,b'", "mode=search", "resume=true",
                    "compare_baseline=false", f"hydra.run.dir='{sweep}/.search/0'"]  # fmt: skip
    # An index outside the plan is an error naming it.
    env.update(VTW_SWEEP_STAGE="point", SLURM_ARRAY_TASK_ID="5")
    r = _run(["bash", SWEEP_SBATCH], env=env)
    assert r.returncode != 0 and "no point 5" in r.stderr


def test_sweep_task_skips_a_finished_point(tmp_path):
    proj, sweep = _fake_project(tmp_path, ["vtw.layer=1,2"])
    done = sweep / "0_vtw.layer=1"
    done.mkdir()
    (done / "job.json").write_text(json.dumps({"status": "ok"}))
    (done / "results.json").write_text("{}")
    env = _env(VTW_SWEEP_DIR=str(sweep), SLURM_ARRAY_TASK_ID="0")
    r = _run(["bash", SWEEP_SBATCH], env=env)
    assert r.returncode == 0 and "already has results" in r.stdout
    assert not (proj / "argv.json").exists()
    # A failed point is run again.
    (done / "job.json").write_text(json.dumps({"status": "failed"}))
    assert _run(["bash", SWEEP_SBATCH], env=env).returncode == 0
    assert (proj / "argv.json").exists()


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
    """Wait until none of the jobs is pending or running; on timeout cancel them and show the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _squeue(*job_ids) == []:
            return
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((sweep_dir / "logs").glob("*.out")))
    pytest.fail(f"{what}: jobs {job_ids} still queued after {timeout:.0f} s\n{logs}")


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


@pytest.mark.slurm
def test_launcher_slurm_runs_the_sweep_as_one_array(cluster, small_job, tmp_path):
    """`python run.py -m launcher=slurm`: one array of 4 tasks; 3 results, the failing point marked in the summary."""
    sweep = tmp_path / "multirun"
    name = f"vtwtest-{os.getpid()}"
    cmd = [
        sys.executable, ROOT / "run.py", "-m", "launcher=slurm", "vtw.layer=null,1,2,99", *small_job,
        f"resume_root={tmp_path}", f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10", "hydra.launcher.array_parallelism=2",
    ]  # fmt: skip
    try:
        r = _run(cmd, cwd=ROOT, timeout=240)
    finally:
        subprocess.run(["scancel", f"--name={name}"])
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
    assert launcher.partition_gres(None, str(sinfo)) == {"cpu": ["(null)"]}
    assert launcher.partition_gres("gpu,mixed", str(sinfo)) == {"gpu": ["gpu:a100:4", "(null)"], "mixed": ["(null)"]}
    assert launcher.partition_gres("nope", str(sinfo)) is None
    assert launcher.partition_gres(None, str(_fake_sinfo(tmp_path, "", code=1) / "sinfo")) is None
    assert launcher.partition_gres(None, str(tmp_path / "no-such-sinfo")) is None
    cpu = {"cpu": ["(null)"]}
    msg = launcher.gpu_mismatch({"gpus_per_node": 1}, cpu)
    assert "'cpu' has no GPUs" in msg and "hydra.launcher.gpus_per_node=1 asks" in msg
    assert "add hydra.launcher.gpus_per_node=null" in msg and "\n" not in msg
    assert "additional_parameters.gres=gpu:1" in launcher.gpu_mismatch(
        {"additional_parameters": {"gres": "gpu:1"}}, cpu
    )
    assert launcher.gpu_mismatch({"gpus_per_node": None}, cpu) is None  # a CPU job
    assert launcher.gpu_mismatch({"gpus_per_node": 0, "gpus_per_task": None}, cpu) is None
    assert launcher.gpu_mismatch({"gpus_per_node": 1}, {"gpu": ["gpu:a100:4", "(null)"]}) is None
    assert launcher.gpu_mismatch({"gpus_per_node": 1}, None) is None  # sinfo could not tell: sbatch decides
    line = launcher.sbatch_refusal("sbatch: error: Invalid generic resource (gres) specification\n")
    assert line.startswith("vtw: sbatch refused the sweep: sbatch: error: Invalid generic resource")
    assert "gpus_per_node=null" in line
    assert "gpus_per_node" not in launcher.sbatch_refusal("sbatch: error: invalid partition specified: x")


def test_failed_submission_leaves_no_half_written_sweep(tmp_path):
    """What a failed launch wrote goes; what was there before stays; a dir left with only multirun.yaml goes."""
    old = tmp_path / "old"
    (old / "0_done").mkdir(parents=True)
    (old / "0_done" / "results.json").write_text("{}")
    (old / "multirun.yaml").write_text("old")
    before = launcher._tree(old)
    (old / ".submitit").mkdir()
    (old / ".submitit" / "x.pkl").write_text("new")
    launcher.undo_submission(old, before)
    assert launcher._tree(old) == before
    new = tmp_path / "new"
    new.mkdir()
    (new / "multirun.yaml").write_text("sweeper")
    before = launcher._tree(new)
    (new / ".submitit" / "1").mkdir(parents=True)
    (new / ".submitit" / "1" / "a.sh").write_text("new")
    launcher.undo_submission(new, before)
    assert not new.exists()


@pytest.mark.slurm
@pytest.mark.parametrize("sinfo_answers", [True, False], ids=["checked-before-submit", "sbatch-refusal"])
def test_launcher_slurm_gpus_on_a_cpu_partition_is_one_line(cluster, small_job, tmp_path, sinfo_answers):
    """The default one GPU per task on the test cluster (no GRES): exit 1, one line naming
    hydra.launcher.gpus_per_node=null, no traceback, no sweep dir left. When sinfo does not answer, sbatch's own
    refusal is turned into the same kind of line."""
    sweep = tmp_path / "multirun"
    env = _env()
    if not sinfo_answers:
        env["PATH"] = f"{_fake_sinfo(tmp_path, '', code=1)}:{env['PATH']}"
    cmd = [sys.executable, ROOT / "run.py", "-m", "launcher=slurm", "vtw.layer=null,1", *small_job,
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


def _submit(args: list, tmp_path: Path) -> dict[str, str]:
    r = _run([SUBMIT, "--gpus", "0", "--cpus-per-task", "1", "--time", "10", "--job-name", f"vtwtest-{os.getpid()}",
              *args], cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return _kv(r.stdout)


@pytest.mark.slurm
def test_sbatch_array_cancel_resubmit_resumes_and_marks_failures(cluster, small_job, tmp_path):
    """slurm/submit_sweep.sh: 4 points (one fails); cancel one task mid-run; resubmit; finished points are kept."""
    sweep = tmp_path / "sweep"
    spec = tmp_path / "spec.txt"
    spec.write_text(f"# K values; 99 is not a layer of the model: that point fails\nvtw.layer=null,1,2,99\n"
                    f"{' '.join(small_job)} resume_root={tmp_path}\n")  # fmt: skip
    ids = _submit(["--sweep-dir", sweep, "--parallel", "2", "--spec", spec], tmp_path)
    array, summary = ids["VTW_ARRAY_JOB"], ids["VTW_SUMMARY_JOB"]
    plan = ss.read_plan(sweep)
    dirs = [sweep / p.dirname for p in plan.points]
    assert [p.dirname for p in plan.points] == ["0_vtw.layer=null", "1_vtw.layer=1", "2_vtw.layer=2", "3_vtw.layer=99"]
    try:
        # Cancel point 2 while its python runs (it starts once point 0 or 1 has finished: --parallel 2).
        deadline = time.monotonic() + 180
        while not ((dirs[2] / "job.json").is_file() and _job(dirs[2])["status"] == "running"):
            assert time.monotonic() < deadline, "point 2 never started"
            time.sleep(0.3)
        assert subprocess.run(["scancel", f"{array}_2"]).returncode == 0
        _wait_gone([array, summary], 180, "first submission", sweep)
    finally:
        subprocess.run(["scancel", array, summary])
    status = {p.index: ss.point_status(sweep, p) for p in plan.points}
    assert status == {0: "ok", 1: "ok", 2: "running", 3: "failed"}
    # The summary job ran after the array and marks the failed point (and the cancelled one as unfinished).
    rows = {row["job"]: row["status"] for row in _summary_rows(sweep)}
    assert rows == {"0_vtw.layer=null": "ok", "1_vtw.layer=1": "ok", "2_vtw.layer=2": "running",
                    "3_vtw.layer=99": "failed"}  # fmt: skip
    assert (sweep / "status.tsv").read_text().splitlines()[1:] == [
        "0\tok\t0_vtw.layer=null", "1\tok\t1_vtw.layer=1", "2\trunning\t2_vtw.layer=2", "3\tfailed\t3_vtw.layer=99"
    ]  # fmt: skip
    # Per-task logs, one file per array task.
    assert sorted(p.name for p in (sweep / "logs").glob(f"{array}_*.out")) == [f"{array}_{i}.out" for i in range(4)]
    assert "CANCELLED" in (sweep / "logs" / f"{array}_2.out").read_text()
    before = {i: ((dirs[i] / "job.json").read_bytes(), (dirs[i] / "results.json").stat().st_mtime_ns) for i in (0, 1)}

    # Resubmit the sweep dir: only the points without results run again, in the same directories.
    ids = _submit(["--sweep-dir", sweep], tmp_path)
    array2, summary2 = ids["VTW_ARRAY_JOB"], ids["VTW_SUMMARY_JOB"]
    try:
        _wait_gone([array2, summary2], 180, "resubmission", sweep)
    finally:
        subprocess.run(["scancel", array2, summary2])
    assert sorted(p.name for p in (sweep / "logs").glob(f"{array2}_*.out")) == [f"{array2}_2.out", f"{array2}_3.out"]
    after = {i: ((dirs[i] / "job.json").read_bytes(), (dirs[i] / "results.json").stat().st_mtime_ns) for i in (0, 1)}
    assert after == before  # not redone, not even touched
    assert _job(dirs[2])["status"] == "ok" and _job(dirs[2])["slurm_job_id"] == array2
    assert json.loads((dirs[2] / "results.json").read_text())["config"]["vtw"]["layer"] == 2
    assert _job(dirs[3])["status"] == "failed" and "vtw.layer=99" in _job(dirs[3])["error"]
    rows = {row["job"]: row["status"] for row in _summary_rows(sweep)}
    assert rows == {"0_vtw.layer=null": "ok", "1_vtw.layer=1": "ok", "2_vtw.layer=2": "ok", "3_vtw.layer=99": "failed"}
    assert [line.split()[2::2] for line in (sweep / "submissions.log").read_text().splitlines()] == [
        [f"array={array}", "summary=" + summary], [f"array={array2}", "summary=" + summary2]
    ]  # fmt: skip


@pytest.mark.slurm
def test_requeued_task_runs_again_in_the_same_dir(cluster, tmp_path):
    """A task SLURM requeues (node failure, preemption, `scontrol requeue`) restarts in its own dir and log."""
    proj, sweep = _fake_project(tmp_path, ["vtw.layer=1,2"])
    # This run.py records each start in its job dir; the first start of point 1 runs long (it gets requeued).
    (proj / "run.py").write_text(
        "import os, sys, time, pathlib\n"
        "out = pathlib.Path(sys.argv[-1].split('=', 1)[1].strip(\"'\"))\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "restart = os.environ.get('SLURM_RESTART_COUNT', '0')\n"
        "with open(out / 'starts.txt', 'a') as f:\n"
        "    f.write(os.environ['SLURM_ARRAY_TASK_ID'] + ' ' + restart + '\\n')\n"
        "if out.name.startswith('1_') and restart == '0':\n"
        "    time.sleep(120)\n"
    )
    (sweep / "logs").mkdir()
    name = f"vtwtest-{os.getpid()}"
    r = _run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--time=5", f"--job-name={name}",
              f"--output={sweep}/logs/%A_%a.out", f"--export=ALL,VTW_SWEEP_DIR={sweep}", SWEEP_SBATCH])  # fmt: skip
    assert r.returncode == 0, r.stderr
    array = r.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while not (sweep / "1_vtw.layer=2" / "starts.txt").is_file():
            assert time.monotonic() < deadline, "task 1 never started"
            time.sleep(0.3)
        assert subprocess.run(["scontrol", "requeue", f"{array}_1"]).returncode == 0
        # SLURM holds a requeued job back for about two minutes; once it is pending again, let it go now.
        deadline = time.monotonic() + 30
        while "JobState=PENDING" not in _run(["scontrol", "show", "job", f"{array}_1"]).stdout:
            assert time.monotonic() < deadline, "task 1 was not requeued"
            time.sleep(0.3)
        assert _run(["scontrol", "update", f"JobId={array}_1", "StartTime=now"]).returncode == 0
        # Wait for what the test is about (the second start), not only for the queue to look empty.
        starts = sweep / "1_vtw.layer=2" / "starts.txt"
        deadline = time.monotonic() + 60
        while starts.read_text().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        _wait_gone([array], 60, "requeued array", sweep)
    finally:
        subprocess.run(["scancel", f"--name={name}"])
    assert (sweep / "0_vtw.layer=1" / "starts.txt").read_text() == "0 0\n"
    log = (sweep / "logs" / f"{array}_1.out").read_text()  # one log, appended to by the second start
    assert (sweep / "1_vtw.layer=2" / "starts.txt").read_text() == "1 0\n1 1\n", log
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
    r = _run([SUBMIT, "--gpus", "0", "--cpus-per-task", "1", "--time", "10", "--job-name", f"vtwtest-{os.getpid()}",
              "--sweep-dir", sweep, "vtw.layer=auto", "vtw.search.limit=2", *small_job, "dataset.limit=1,2",
              f"resume_root={tmp_path}"], env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ids = _kv(r.stdout)
    jobs = [ids["VTW_SEARCH_JOB"], ids["VTW_ARRAY_JOB"], ids["VTW_SUMMARY_JOB"]]
    assert all(jobs)
    try:
        _wait_gone(jobs, 240, "search + array + summary", sweep)
    finally:
        subprocess.run(["scancel", *jobs])
    plan = ss.read_plan(sweep)
    assert len(plan.points) == 2 and len(plan.search) == 2  # dataset.limit differs: one search job per point
    searches = [sweep / ".search" / str(i) for i in range(2)]
    points = [sweep / p.dirname for p in plan.points]
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
