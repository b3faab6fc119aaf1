"""Data parallel inside one job (torchrun, 2 CPU processes, gloo) against one process; the refusals; device maps.

The end-to-end test runs ``run.py`` once in one process and once under ``torchrun --nproc_per_node 2`` on the tiny
fixture model, a generation and a multiple-choice task, an odd document count (lmms-eval pads the short rank with a
copy of its last request), the layer search (``vtw.layer=auto``) and the baseline comparison, and checks that the
two-process job wrote one directory, one ``results.json`` / ``samples.jsonl`` equal to the one-process run's (every
figure but the timings), every document exactly once, one W&B run, and one layer search.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_lmms_fixtures import pipeline_overrides

from vtw.io import read_json

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 5  # odd: 3 documents on rank 0, 2 (+ one padding copy) on rank 1
TIMED = {"latency_s", "samples_per_s", "wall_s", "peak_mem_gb"}  # measured, not computed: differ run to run


def _run(cmd: list[str], cwd: Path, cache: Path) -> float:
    # One CPU thread in every process, the one-process run included: torchrun gives each worker OMP_NUM_THREADS=1
    # when it is unset, and CPU kernels reduce in another order with another thread count (the first-token KL then
    # differs in its fourth digit). With the same count both runs do the same arithmetic, so the figures compare
    # exactly.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VTW_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    for k in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "VTW_LAUNCH_UID", "VTW_LAUNCH_TIME"):
        env.pop(k, None)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return time.perf_counter() - t0


def _job_dir(cwd: Path) -> Path:
    dirs = [d for d in (cwd / "outputs" / "run").glob("*/*") if d.is_dir()]
    assert len(dirs) == 1, dirs  # every rank in the same Hydra output directory
    return dirs[0]


def _samples(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMED}


@pytest.mark.slow
def test_two_processes_equal_one(tiny_llava_dir, tiny_tasks, tmp_path):
    from wandb_offline import find_offline_runs

    root, names = tiny_tasks
    args = pipeline_overrides(tiny_llava_dir, root, [names["gen"], names["mc"]], f"dataset.limit={LIMIT}",
                              "vtw.layer=auto", "vtw.search.limit=2", "vtw.search.eta=1000", "compare_baseline=true",
                              "logger.mode=offline", "model.batch_size=1")  # fmt: skip
    # batch_size=1: a rank cannot batch another rank's documents, and a different batch composition (left padding)
    # moves the first-token KL in its third digit; one request per forward makes every figure comparable exactly
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    t1 = _run([sys.executable, str(ROOT / "run.py"), *args], one, one / "cache")
    t2 = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(ROOT / "run.py"), *args], two, two / "cache")  # fmt: skip
    a, b = _job_dir(one), _job_dir(two)
    ra, rb = read_json(a / "results.json"), read_json(b / "results.json")
    assert rb["job"]["processes"] == 2 and ra["job"]["processes"] == 1
    for variant in ("result", "baseline"):
        assert rb[variant]["processes"] == 2
        assert _untimed({**ra[variant], "processes": 2}) == _untimed(rb[variant]), variant
    assert rb["result"]["layer"] is not None and rb["result"]["label"] == "vtw"  # the search chose a K < L
    sa, sb = _samples(a), _samples(b)
    for variant in ("baseline", "vtw"):  # every document of every task exactly once, in one process's order
        for task in names.values():
            ids = [s["doc_id"] for s in sb if s["variant"] == variant and s["task"] == task]
            assert ids == list(range(LIMIT)), (variant, task, ids)
    assert [_untimed(s) for s in sa] == [_untimed(s) for s in sb]
    # one layer search (rank 0's), written once; one W&B run; rank 1 kept its own status file
    search = read_json(b / "layer_search.json")
    assert search["layer"] == rb["result"]["layer"] and not search["reused_cache"]
    assert len(list((two / "cache").glob("*.json"))) == 1
    assert len(find_offline_runs(two)) == 1 and len(find_offline_runs(one)) == 1
    assert read_json(b / "job.json")["status"] == "ok" and read_json(b / "job.rank1.json")["status"] == "ok"
    n = 2 * len(sb) // 2  # samples of both variants
    print(f"\n1 process: {t1:.1f} s wall, {ra['result']['samples_per_s']:.1f} samples/s (model);"
          f" 2 processes: {t2:.1f} s wall, {rb['result']['samples_per_s']:.1f} samples/s (model); {n} rows")  # fmt: skip


def _world(monkeypatch, size: int, rank: int = 0) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(size))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


def test_data_parallel_refuses_device_map_and_other_modes(monkeypatch, tiny_llava_dir):
    from vtw.lmms.model import VTWModel
    from vtw.pipeline.config import compose_config, validate_config

    _world(monkeypatch, 2)
    with pytest.raises(ValueError) as info:
        validate_config(compose_config(["model.device_map=auto"]))
    assert "model.device_map='auto'" in str(info.value) and "WORLD_SIZE=2" in str(info.value)
    with pytest.raises(ValueError) as info:
        validate_config(compose_config(["mode=flops"]))
    assert "mode=flops runs in one process" in str(info.value)
    with pytest.raises(ValueError) as info:  # before any weight: no process group is joined either
        VTWModel(pretrained=str(tiny_llava_dir), device="cpu", device_map="auto")
    assert "cannot be combined with data parallel" in str(info.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert validate_config(compose_config(["model.device_map=auto"])).model.device_map == "auto"


def test_device_map_and_max_memory_values():
    from vtw.options import parse_device_map
    from vtw.pipeline.config import compose_config, validate_config

    assert parse_device_map("none", None) == (None, None)
    assert parse_device_map("auto", "0:20GiB;1:20GiB;cpu:64GiB") == ("auto", {0: "20GiB", 1: "20GiB", "cpu": "64GiB"})
    for device_map, max_memory, needle in [
        ("everywhere", None, "device_map must be one of ('auto', 'balanced', 'balanced_low_0', 'sequential')"),
        (None, "0:20GiB", "needs a device_map"),
        ("auto", "20GiB", "must be 'device:size' items"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_device_map(device_map, max_memory)
        assert needle in str(info.value), (device_map, max_memory, str(info.value))
    with pytest.raises(ValueError) as info:
        validate_config(compose_config(["model.device_map=gpu0"]))
    assert str(info.value).startswith("model.device_map must be one of")


def test_world_from_slurm_steps_only(monkeypatch):
    """A SLURM *step* with 2 tasks is a world of 2 (submitit's variables); the batch script of a job that asked
    ``--ntasks=4`` is one process (it would wait forever for 3 peers otherwise)."""
    from vtw.lmms.distributed import World, world

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)  # a plain `srun python run.py`
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[7-9,12]", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}  # fmt: skip
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert world() == World()  # batch script: no step
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    saved = dict(os.environ)  # world() exports RANK, WORLD_SIZE, ... into os.environ: restore them after
    try:
        assert world() == World(rank=1, size=4, local_rank=1)
        assert os.environ["MASTER_ADDR"] == "node7" and os.environ["MASTER_PORT"] == str(20000 + 4242)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_ranks_share_the_launch_directory(monkeypatch):
    """Hydra's run dir (date, time, uid) comes from ``VTW_LAUNCH_TIME`` / ``VTW_LAUNCH_UID`` when set (rank 0's,
    :func:`share_launch`): two processes composing a second apart get the same directory."""
    from hydra import compose, initialize_config_dir

    from vtw.pipeline.config import CONF_DIR
    from vtw.pipeline.resolvers import register_resolvers
    from vtw.pipeline.schema import register_schema

    register_resolvers(), register_schema()

    def run_dir() -> str:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return str(compose(config_name="config", return_hydra_config=True).hydra.run.dir)

    monkeypatch.setenv("VTW_LAUNCH_TIME", "2026-01-02T03:04:05")
    monkeypatch.setenv("VTW_LAUNCH_UID", "abc123")
    assert run_dir() == "outputs/run/2026-01-02/03-04-05-abc123"
    monkeypatch.delenv("VTW_LAUNCH_UID")
    assert run_dir() != run_dir()  # without it each launch draws its own uid


def test_device_map_loads_and_matches_one_device(tiny_llava_dir, tmp_path):
    """``device_map`` through the ``vtw`` model gives the single-device model's outputs; and the withdrawal (VTW
    and PyramidDrop's three stages) composes with accelerate's dispatch hooks when the decoder layers are split
    between the CPU and disk offload (weights loaded per forward onto the CPU)."""
    from accelerate import dispatch_model
    from transformers import LlavaForConditionalGeneration

    from vtw import withdraw
    from vtw.lmms.model import VTWModel

    lm = VTWModel(pretrained=str(tiny_llava_dir), device="cpu", device_map="auto", progress=False)
    assert lm.device_map == "auto" and lm.device == torch.device("cpu")  # one CPU: accelerate puts all there
    plain = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    torch.manual_seed(0)
    n_img = plain.config.vision_config.image_size // plain.config.vision_config.patch_size
    ids = torch.randint(5, plain.config.text_config.vocab_size - 2, (2, 12))
    ids = torch.cat([ids[:, :3], torch.full((2, n_img**2), plain.config.image_token_id), ids[:, 3:]], 1)
    pixels = torch.randn(2, 3, plain.config.vision_config.image_size, plain.config.vision_config.image_size)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids, pixel_values=pixels).logits,
                           plain(input_ids=ids, pixel_values=pixels).logits)  # fmt: skip
        L = plain.config.text_config.num_hidden_layers
        cfgs = [dict(layer=L // 2), dict(method="pdrop", layers=(1, L // 2, L - 1), keep=(0.5, 0.25, 0.125))]
        want = []
        for kw in cfgs:
            with withdraw(plain, **kw):
                want.append(plain.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False))
        names = [n for n, _ in plain.named_modules() if n.endswith("language_model.layers")]
        split = {f"{names[0]}.{i}": ("cpu" if i < L // 2 else "disk") for i in range(L)}
        rest = {n: "cpu" for n, _ in plain.named_children()}
        dispatched = dispatch_model(plain, device_map={**rest, **split}, offload_dir=str(tmp_path))
        deep = dispatched.get_submodule(names[0])[L - 1]
        assert deep.self_attn.q_proj.weight.device.type == "meta" and hasattr(deep, "_hf_hook")  # really on disk
        for kw, expected in zip(cfgs, want):
            with withdraw(dispatched, **kw):
                got = dispatched.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
            assert torch.equal(got, expected), kw


def test_later_stages_follow_the_hidden_states_device():
    """A later stage's inputs (the previous segment's index, mask, vision and extra flags, masks, positions, recorded
    values) are moved to the device of the hidden states entering it, every field (here onto ``meta``, a second
    device any CPU has)."""
    from vtw.withdraw import _Segment

    t = torch.ones(2, 3)
    seg = _Segment(t.long(), t.long(), t.bool(), t.bool(), t[:, None], (t, t), t.long(), t[..., None])
    moved = seg.to(torch.device("meta"))
    tensors = [moved.keep_index, moved.mask2d, moved.vision, moved.extra, moved.mask4d, *moved.position_embeddings]
    assert all(x.device.type == "meta" for x in [*tensors, moved.position_ids, moved.hidden])
    assert [x.dtype for x in tensors] == [
        torch.long,
        torch.long,
        torch.bool,
        torch.bool,
        torch.float32,
        torch.float32,
        torch.float32,
    ]
    assert _Segment(t.long(), t.long(), t.bool(), t.bool()).to(torch.device("meta")).mask4d is None
