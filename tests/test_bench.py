"""Smoke runs of the benchmarks (no timing assertion): the GPU-ready `--config` path of bench_withdraw.py on a shrunk
shipped config, on CPU, and bench_methods.py on a small model. The KV-cache bytes measured after prefill must equal
the analytic figure in every row (a real check, independent of the machine's speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_bench_methods_small():
    out = _bench("bench_methods.py", "--layers", "4", "--hidden", "64", "--reps", "1")
    for name in ("vtw K=", "fastv K=2", "pdrop L=1,2,3", "random_vision K=2"):
        assert name in out, out
    assert "fastv scoring overhead" in out and "pdrop scoring overhead" in out


def test_bench_methods_on_a_shipped_config_shrunk():
    out = _bench("bench_methods.py", "--config", "llava-1.5-7b", "--shrink", "--reps", "1", "--device", "cpu")
    assert "llava-1.5-7b shapes (random init): L=4" in out and "576 vision + 60 text tokens" in out
    for name in ("vtw K=", "fastv K=2", "pdrop L=1,2,3", "random_vision K=2"):
        assert name in out, out
