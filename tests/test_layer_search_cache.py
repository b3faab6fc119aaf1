"""The layer-search cache: reused for identical inputs, recomputed when any key input changes, shared by concurrent
jobs (one search, the others wait for it), and the KL plot."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

from vtw.pipeline.layer_search import cache_key, cached_search, plot_search
from vtw.search import SearchResult

FIELDS = {
    "model": "m",
    "dtype": "float32",
    "tasks": ["t"],
    "limit": 20,
    "eta": 0.003,
    "min_layer": 1,
    "max_layer": None,
    "direction": "reference",
    "vtw": "0",
    "transformers": "x",
}


def _result(layer=3, marker=0.0) -> SearchResult:
    return SearchResult(
        layer=layer,
        eta=0.003,
        min_layer=1,
        max_layer=7,
        num_layers=8,
        direction="reference",
        num_samples=2,
        kl={1: 0.5 + marker, 3: 0.001, 8: 0.0},
        kl_per_sample=[],
        message="m",
    )


def test_reuse_and_invalidation(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _result(marker=len(calls))

    first = cached_search(FIELDS, compute, tmp_path)
    again = cached_search(dict(FIELDS), compute, tmp_path)
    assert len(calls) == 1 and not first.reused and again.reused
    assert again.result == first.result
    for key, value in [("eta", 0.001), ("limit", 5), ("tasks", ["t", "u"]), ("model", "other"), ("min_layer", 2)]:
        changed = cached_search({**FIELDS, key: value}, compute, tmp_path)
        assert not changed.reused, key
    assert len(calls) == 6
    stored = json.loads((tmp_path / f"{cache_key(FIELDS)}.json").read_text())
    assert stored["key_fields"] == FIELDS and SearchResult.from_dict(stored["result"]) == first.result


def _worker(directory: str, log: str) -> None:
    def compute():
        with open(log, "a") as fh:
            fh.write("computed\n")
        time.sleep(1.0)  # long enough for the other process to reach the lock
        return _result()

    out = cached_search(FIELDS, compute, Path(directory))
    with open(log, "a") as fh:
        fh.write(f"layer={out.result.layer} reused={out.reused}\n")


def test_concurrent_jobs_share_one_search(tmp_path):
    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert lines.count("computed") == 1
    assert sorted(line for line in lines if line.startswith("layer")) == ["layer=3 reused=False", "layer=3 reused=True"]


def test_plot_is_written(tmp_path):
    path = plot_search(_result(), tmp_path / "kl.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_search(_result(layer=None), tmp_path / "none.png")  # the no-candidate case plots too
    assert not list(tmp_path.glob(".*tmp*"))
