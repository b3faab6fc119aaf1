"""Smoke runs of the benchmarks (no timing assertion): the GPU-ready `--config` path of bench_withdraw.py on a shrunk
shipped config, on CPU, and bench_methods.py on a small model. The KV-cache bytes measured after prefill must equal
the analytic figure in every row (a real check, independent of the machine's speed). bench_methods.py's scoring timer
is checked in-process: it times the method's own select (a select made slower by a known sleep), changes no result,
and leaves the method untouched; the benchmark takes its methods from the registry it is given."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vtw import withdraw
from vtw.methods import METHODS, FastV, PyramidDrop, Reduction, Withdrawal

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _bench(script: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                       env=ENV, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_bench_withdraw_on_a_shipped_config_shrunk():
    """The GPU command (``--config``, default K = 3L/4, L/2, L/4: 24, 16, 8 for a 7B) on CPU with a shrunk config."""
    out = _bench("bench_withdraw.py", "--config", "llava-1.5-7b", "--shrink", "--reps", "1", "--steps", "2",
                 "--device", "cpu")  # fmt: skip
    assert "llava-1.5-7b shapes (random init): L=4" in out and "576 vision + 60 text tokens" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("vanilla", "K="))]
    assert [r[0] for r in rows] == ["vanilla", "K=3", "K=2", "K=1"]
    for r in rows:
        assert r[-2] == r[-1], r  # KV MiB measured == analytic
    assert float(rows[3][-2]) < float(rows[2][-2]) < float(rows[1][-2]) < float(rows[0][-2])


def _tables(out: str) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """``(speedup rows, scoring rows, skipped)`` of bench_methods.py's output, keyed by the registry name: the rows
    as printed / split on whitespace (``[lo-hi]`` split into ``lo hi``), the refusals."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("name") and "FLOPs share" in line)
    score = next(i for i, line in enumerate(lines) if line.startswith("name") and "scoring ms" in line)
    speed = {line.split()[0]: line for line in lines[head + 1 : score - 1] if not line.startswith(("not ", "skip"))}
    scoring = {line.split()[0]: re.sub(r"(\d)-(\d)", r"\1 \2", line).replace("[", " ").replace("]", " ").split()[1:]
               for line in lines[score + 1 :]}  # fmt: skip
    skipped = {}
    for line in lines:
        if line.startswith("skipped: "):
            name, why = line.removeprefix("skipped: ").split(": ", 1)
            skipped[name] = why
    return speed, scoring, skipped


def _check_scoring_row(row: list[str]) -> None:
    """scoring ms median [min max], prefill ms, share % median [min max], IQR pp, range pp: the orders that hold
    whatever the machine's speed (each select runs inside its prefill, so its time is below the prefill's)."""
    ms, ms_lo, ms_hi, prefill, share, lo, hi, iqr, span = (float(x) for x in row[:9])
    assert ms_lo <= ms <= ms_hi and lo <= share <= hi and 0 <= lo and hi <= 100, row
    assert ms < prefill and 0 <= iqr <= span + 0.011 and abs(span - (hi - lo)) <= 0.016, row


def test_bench_methods_small():
    """The command line: every registered method is timed or listed as skipped with its refusal; the scoring table
    has a row per timed method with its share and spread, and a verdict against the targets of FastV and PDrop."""
    out = _bench("bench_methods.py", "--layers", "4", "--hidden", "64", "--reps", "2")
    speed, scoring, skipped = _tables(out)
    assert "vanilla" in speed
    for name in METHODS:
        assert (name in speed) != (name in skipped), (name, out)
        if name in speed:
            assert len(scoring[name]) == 12, (name, out)
            _check_scoring_row(scoring[name])
    for name in ("vtw K=", "fastv K=2", "pdrop L=1,2,3", "random_vision K=2"):
        assert name in out, out
    for name in ("fastv", "pdrop"):
        assert scoring[name][-2:] in (["<=3%", "PASS"], ["<=3%", "FAIL"]), scoring[name]
    assert "IQR pp" in out and "range pp" in out and "share %" in out
    assert "sparsevlm" not in speed or scoring["sparsevlm"][-2] == "<=5%"


def test_bench_choose_small():
    """The cost of vtw.method=auto beside the lone runs: both rows, and the prefill counts of the module docstring
    (the lone runs repeat the full model once per candidate: n candidates more full prefills per prompt)."""
    out = _bench("bench_choose.py", "--prompts", "2", "--max-new-tokens", "2")
    rows = dict(re.findall(r"^(choice|lone runs) +[\d.]+ +([\d.]+)$", out, re.M))
    assert set(rows) == {"choice", "lone runs"}, out
    candidates = int(re.search(r"(\d+) candidates", out).group(1))
    assert candidates == len(METHODS) - 1, out  # every method but dycoke (videos only) acts on tiny-llava
    assert float(rows["lone runs"]) - float(rows["choice"]) == pytest.approx(candidates - 1, abs=0.011), out
    assert "bound 1.5 x (1 + sum of shares)" in out


def test_bench_methods_on_a_video():
    """``--video``: a Video-LLaVA-shaped model and one video (2 frames x 257 tokens), so the video methods act: every
    registered method is timed (none refuses a Video-LLaVA video), DyCoke among them."""
    out = _bench("bench_methods.py", "--layers", "4", "--hidden", "64", "--reps", "1", "--video", "2")
    assert "Video-LLaVA-shaped model: L=4" in out and "514 vision + 60 text tokens" in out, out
    speed, scoring, skipped = _tables(out)
    assert not skipped and set(METHODS) <= set(speed), out
    assert "dycoke keep=" in speed["dycoke"] and float(speed["dycoke"].split()[3]) < 1, speed["dycoke"]
    _check_scoring_row(scoring["dycoke"])


def test_bench_methods_on_a_shipped_config_shrunk():
    out = _bench("bench_methods.py", "--config", "llava-1.5-7b", "--shrink", "--reps", "1", "--device", "cpu")
    assert "llava-1.5-7b shapes (random init): L=4" in out and "576 vision + 60 text tokens" in out
    for name in ("vtw K=", "fastv K=2", "pdrop L=1,2,3", "random_vision K=2"):
        assert name in out, out
    _, scoring, _ = _tables(out)
    _check_scoring_row(scoring["pdrop"])


@pytest.fixture(scope="module")
def bench():
    """bench/bench_methods.py as a module, and its benchmark model at 4 layers of width 64 with its prompt."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        module = importlib.import_module("bench_methods")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    model = module.load(argparse.Namespace(threads=None, device="cpu", dtype=None, config=None, layers=4, hidden=64))[0]
    return module, model, module.inputs_for(model, 60)


SLEEP = 0.03
_PDROP_SELECT = PyramidDrop.select  # the class's own select, to check the bench leaves it


@dataclass(frozen=True)
class SleepyStages(Reduction):
    """Three stages (layers 1, 2, 3) that keep every token, each select sleeping ``SLEEP`` seconds first."""

    name = "sleepy"
    registered = False

    def stages(self) -> tuple[int, ...]:
        return (1, 2, 3)

    def select(self, ctx):
        time.sleep(SLEEP)
        return torch.ones_like(ctx.vision)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        return vision, text


@torch.no_grad()
def test_the_timer_times_the_select_alone_and_changes_nothing(bench):
    """The timer adds up the wall time of every select of a prefill (three stages sleeping ``SLEEP`` each: at least
    ``3 SLEEP``, less than the whole prefill); the timed run gives the untimed run's logits, bit for bit; the
    method object and its class are untouched; each installation gets a fresh timer."""
    module, model, inputs = bench
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    with module.timed_withdraw(model, SleepyStages(), cpu) as timer:
        model(**inputs, use_cache=True)
    assert timer.calls == 3 and 3 * SLEEP <= timer.seconds < time.perf_counter() - t0
    method = PyramidDrop(layers=(1, 2, 3))
    with withdraw(model, method=method):
        plain = model(**inputs, use_cache=True).logits
    with module.timed_withdraw(model, method, cpu) as timer:
        timed = model(**inputs, use_cache=True).logits
    assert timer.calls == 3 and timer.seconds > 0
    assert torch.equal(timed, plain)
    assert "select" not in vars(method) and PyramidDrop.select is _PDROP_SELECT


@dataclass(frozen=True)
class Refuser(FastV):
    """A method that refuses every model (FastV's candidates are of its own class)."""

    name = "refuser"
    registered = False

    def check_supported(self, config, *, video: bool = False) -> None:
        raise ValueError("refuser cannot act on llava: a test refusal\nsecond line")


@dataclass(frozen=True)
class Fixed(Withdrawal):
    """A method without a free parameter (withdraws at layer 3)."""

    name = "fixed"
    registered = False
    layer: int | None = 3

    def budget_candidates(self, num_layers: int) -> list:
        return []


def test_the_bench_takes_its_methods_from_the_registry(bench, capsys):
    """A registry of a method the model refuses, one without a free parameter, and FastV: the refusal is listed on
    one line, the unmatched method runs at its defaults and is said to, FastV is matched and judged."""
    module = bench[0]
    module.main(
        ["--layers", "4", "--hidden", "64", "--reps", "1"], {"refuser": Refuser, "fixed": Fixed, "fastv": FastV}
    )
    out = capsys.readouterr().out
    speed, scoring, skipped = _tables(out)
    assert list(speed) == ["vanilla", "fixed", "fastv"] and list(scoring) == ["fixed", "fastv"]
    assert skipped == {"refuser": "refuser cannot act on llava: a test refusal"}
    assert "not budget-matched: fixed (no budget_candidates; run at its defaults)" in out
    assert "vtw K=3" in speed["fixed"] and scoring["fixed"][-2:] == ["-", "-"]
    assert scoring["fastv"][-1] in ("PASS", "FAIL")
    for name in ("fixed", "fastv"):  # one rep: the share is that prefill's select ms / prefill ms
        ms, prefill, share = (float(scoring[name][i]) for i in (0, 3, 4))
        assert abs(share - 100 * ms / prefill) <= 0.006 + 0.005 * 100 / prefill, scoring[name]
