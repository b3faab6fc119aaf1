"""Loyalty to the full model: hand-made samples files with hand-computed figures, the full model against itself
(exactly 1, KL exactly 0), a withdrawal that changes answers, and a sweep's summary against its baseline job."""

from __future__ import annotations

import json
import math

import pytest
from test_pipeline_sweep import _job as _sweep_job
from test_pipeline_sweep import _variant

from vtw.io import read_jsonl
from vtw.pipeline.loyalty import answer, loyalty
from vtw.pipeline.summary import summarize_sweep


def _row(task, doc, response, first=None, kl=None, variant="vtw"):
    return {"variant": variant, "task": task, "doc_id": doc, "response": response, "first_token_id": first,
            "first_token_kl": kl}  # fmt: skip


BASE = [_row("gen", 0, "red", 5), _row("gen", 1, "blue ", 7), _row("gen", 2, "two", 9),
        _row("mc", 0, [[1.2, False], [0.3, True]]), _row("mc", 1, [[0.1, True], [2.0, False]])]  # fmt: skip
OTHER = [
    _row("gen", 0, "red", 5, 0.01),
    _row("gen", 1, "blue", 4, 0.5),
    _row("gen", 2, "three", 9, 0.09),
    _row("mc", 0, [[0.2, True], [0.9, False]]),
    _row("mc", 1, [[0.3, True], [2.5, False]]),
    _row("gen", 3, "extra", 1, 9.0),
]  # fmt: skip  (doc 3 has no reference: left out)


def test_hand_made_rows_give_the_hand_computed_figures():
    # answers: gen 0 same, gen 1 same ("blue" after strip), gen 2 differs, mc 0 option 1 vs 0 differs, mc 1 same
    assert answer("blue ") == "blue" and answer([[1.2, False], [0.3, True]]) == 1
    got = loyalty(OTHER, BASE)
    assert got["loyalty"] == pytest.approx(3 / 5) and got["loyalty_samples"] == 5
    assert got["first_token_agreement"] == pytest.approx(2 / 3)  # ids 5=5, 4!=7, 9=9
    assert got["first_token_kl"] == pytest.approx((0.01 + 0.5 + 0.09) / 3)
    assert loyalty(BASE, BASE)["loyalty"] == 1.0 and loyalty([], BASE)["loyalty"] is None


def _job(d, variant: str, layer, rows):
    """A finished job of ``variant`` whose samples are ``rows`` (test_pipeline_sweep's hand-made jobs)."""
    v = _variant(variant, layer, 0.5, 1.0, 2.0)
    _sweep_job(d, v, samples=[{**row, "variant": variant} for row in rows])


def test_sweep_summary_computes_loyalty_against_its_baseline_job(tmp_path):
    _job(tmp_path / "0_base", "baseline", None, BASE)
    _job(tmp_path / "1_k2", "vtw", 2, OTHER)
    s = summarize_sweep(tmp_path, plot=False, console=False)
    rows = {r["job"]: r for r in s.rows}
    assert rows["1_k2"]["loyalty"] == pytest.approx(3 / 5) and rows["0_base"]["loyalty"] == 1.0
    assert rows["1_k2"]["first_token_agreement"] == pytest.approx(2 / 3)
    assert not s.notes and "loyalty" in (tmp_path / "summary.md").read_text()
    # without a baseline job it says so, and invents nothing
    (tmp_path / "0_base" / "results.json").unlink()
    (tmp_path / "0_base" / "job.json").unlink()
    s = summarize_sweep(tmp_path, plot=False, console=False)
    assert [r.get("loyalty") for r in s.rows] == [None]
    assert "no baseline job" in s.notes[0] and "no baseline job" in (tmp_path / "summary.md").read_text()


def test_full_model_against_itself_is_exactly_loyal_and_withdrawal_lowers_it(tiny_llava_dir, tiny_tasks):
    """The vtw model's first-token records: the full model against its own stored distributions has top-1 agreement
    1 and KL exactly 0; VTW at K=0 (the decoder never sees the image) moves the distribution on every sample (the
    random-init fixture model barely looks at its image, so its answers may stay; the lone-run test below and the
    embedded default's sweep show answers that change)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from vtw.lmms.model import VTWModel

    root, names = tiny_tasks
    tm = TaskManager(include_path=str(root), include_defaults=False)
    task = get_task_dict([names["gen"]], tm)[names["gen"]]
    task.build_all_requests(limit=6, rank=0, world_size=1)
    lm = VTWModel(pretrained=str(tiny_llava_dir), device="cpu", progress=False, batch_size=3)
    lm.task_dict[names["gen"]] = task.dataset
    lm.first_token_store = {}
    full = lm.generate_until(task.instances)
    lm.first_token_reference, lm.first_token_store = lm.first_token_store, None
    lm.pop_records()
    again = lm.generate_until(task.instances)
    records = lm.pop_records()
    assert [r.text for r in again] == [r.text for r in full]
    assert all(r.first_token_agree is True and r.first_token_kl == 0.0 for r in records)
    lm.set_layer(0)
    blind = lm.generate_until(task.instances)
    records = lm.pop_records()
    kls = [r.first_token_kl for r in records]
    assert all(k is not None and k > 0 for k in kls)  # the distribution moved on every sample (self: exactly 0)
    assert len(blind) == len(full) and all(r.first_token_agree is not None for r in records)


def test_lone_run_records_loyalty_consistent_with_its_samples(tiny_llava_dir, tiny_tasks, tmp_path):
    from test_lmms_fixtures import pipeline_overrides

    from vtw.pipeline.config import compose_config
    from vtw.pipeline.job import JobContext, run_job

    root, names = tiny_tasks
    cfg = compose_config([*pipeline_overrides(tiny_llava_dir, root, [names["gen"], names["mc"]], "vtw.layer=0"),
                          "compare_baseline=true", "logger=none"])  # fmt: skip
    outcome = run_job(cfg, JobContext(output_dir=tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    samples = read_jsonl(tmp_path / "samples.jsonl")
    base = {(s["task"], s["doc_id"]): s for s in samples if s["variant"] == "baseline"}
    mine = [s for s in samples if s["variant"] == "vtw"]
    same = [answer(s["response"]) == answer(base[(s["task"], s["doc_id"])]["response"]) for s in mine]
    assert res["result"]["loyalty"] == pytest.approx(sum(same) / len(same))
    gen = [s for s in mine if s["task"] == names["gen"]]
    assert res["result"]["first_token_kl"] == pytest.approx(sum(s["first_token_kl"] for s in gen) / len(gen))
    assert res["baseline"]["loyalty"] == 1.0 and res["baseline"]["first_token_kl"] == 0.0
    assert outcome.status == "ok" and not math.isnan(res["summary"]["loyalty"])
