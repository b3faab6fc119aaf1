"""``vtw.choose.choose_method`` (the core of ``vtw.method=auto``) against a brute force written here: every candidate run
alone at its budget setting on the same prompts, its agreement with the full model recomputed from the logits, the
winner by the documented rule; the 95% intervals by hand; bad input before any forward."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from test_flops import _token_counts
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw import withdraw
from vtw.choose import Score, choose_method, mean_ci, pick, wilson
from vtw.flops import SampleCounts
from vtw.flops.budget import match_budget
from vtw.methods import make_method
from vtw.synthvqa.generator import iter_items
from vtw.synthvqa.model import conversation_text

STEPS = 3
BUDGET = 0.5
ASSET = Path(__file__).resolve().parent.parent / "vtw" / "assets" / "tiny-llava"


@functools.cache
def _setup():
    """The shipped tiny-llava (vision matters to its answers) and 8 synthvqa *train* items, one prompt each."""
    model = LlavaForConditionalGeneration.from_pretrained(ASSET, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    samples = []
    for item in iter_items("train", 8):
        text = conversation_text(processor.tokenizer, [(item.prompt, item.answer)], add_generation_prompt=True)
        samples.append(dict(processor(images=[item.image()], text=[text], return_tensors="pt")))
    prompts = [SampleCounts(*_token_counts(model, s["input_ids"]), vision_inputs=1) for s in samples]
    return model, samples, prompts


def _candidates():
    return [make_method("vtw", layer=2), make_method("fastv", layer=6), make_method("random_vision", layer=2),
            make_method("pool"), make_method("visionzip"), make_method("divprune"),
            make_method("dart", layer=2)]  # fmt: skip  # FastV at layer 6 of 8 cannot go down to half: over budget


def _brute_force(model, samples, prompts, method):
    """``(agreement, top-1 agreement, mean KL(P_full || P), over budget)`` of ``method``'s budget setting, run
    here."""
    match = match_budget(model.config, prompts, method, BUDGET)
    setting = match.method
    agree = top1 = 0
    kls = []
    for s in samples:
        with torch.no_grad():
            full = model.generate(**s, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)  # fmt: skip
            with withdraw(model, method=setting):
                mine = model.generate(**s, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)  # fmt: skip
        n = s["input_ids"].shape[1]
        agree += full.sequences[0, n:].tolist() == mine.sequences[0, n:].tolist()
        p, q = (torch.softmax(x.logits[0][0].double(), -1) for x in (full, mine))
        top1 += int(p.argmax()) == int(q.argmax())
        kls.append(float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0)))
    return agree / len(samples), top1 / len(samples), sum(kls) / len(kls), match.ratio > BUDGET + 0.05


def test_the_choice_equals_a_brute_force_of_every_candidate_alone():
    model, samples, prompts = _setup()
    choice = choose_method(model, samples, prompts, _candidates(), BUDGET, max_new_tokens=STEPS)
    expected = {}
    for method in _candidates():
        agree, top1, kl, over = _brute_force(model, samples, prompts, method)
        score = choice.score(method.name)
        assert (score.agree, score.top1) == (agree, top1), method.name
        assert score.kl == pytest.approx(kl, rel=1e-3, abs=1e-6), method.name  # float32 log-softmax
        assert score.over_budget == over, method.name
        expected[method.name] = (over, -agree, kl, -top1)
    assert choice.chosen == min(expected, key=expected.get)
    assert len({s.agree for s in choice.scores}) > 1, "the prompts do not tell the candidates apart"
    assert [s.name for s in choice.scores if s.over_budget] == ["fastv"]
    assert choice.prompts == len(samples) and choice.budget == BUDGET
    shares = [s.budget_ratio for s in choice.scores]
    assert choice.cost["prefills_per_prompt"] == pytest.approx(1 + sum(shares))
    assert choice.cost["flops_per_prompt_in_full_prefills"] <= choice.cost["bound"]


def test_the_rule_by_hand():
    """Within the budget first, then agreement, KL, top-1, order; over budget wins only where everything is."""

    def score(agree, kl, top1, over=False):
        return Score("m", "m", {}, 0.5, agree, (0, 1), top1, (0, 1), kl, (0, 1), 8, 0.5, over)

    assert pick([score(1.0, 0.0, 1.0, over=True), score(0.5, 1.0, 0.5)]) == 1
    assert pick([score(0.5, 1.0, 0.5), score(0.75, 2.0, 0.5), score(0.75, 1.0, 0.5)]) == 2
    assert pick([score(0.75, 1.0, 0.5), score(0.75, 1.0, 0.75)]) == 1
    assert pick([score(0.75, 1.0, 0.5), score(0.75, 1.0, 0.5)]) == 0
    assert pick([score(0.25, 1.0, 0.5, over=True), score(0.5, 1.0, 0.5, over=True)]) == 1


def test_the_intervals_by_hand():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(8, 10)  # p = 0.8, z = 1.96: centre 0.7138, half 0.2126 (by hand)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    mean, (a, b) = mean_ci([1.0, 2.0, 3.0])  # sd 1, half 1.96 / sqrt(3)
    assert mean == 2.0 and b - mean == pytest.approx(1.959964 / math.sqrt(3)) and mean - a == b - mean
    assert mean_ci([0.5]) == (0.5, (0.5, 0.5))


def test_bad_input_fails_before_any_forward():
    model, samples, prompts = _setup()
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for args, needle in [
            (([], [], _candidates(), BUDGET), "no calibration prompts"),
            ((samples, prompts[:2], _candidates(), BUDGET), "8 calibration prompts"),
            ((samples, prompts, [], BUDGET), "no candidate"),
            ((samples, prompts, _candidates(), 1.5), "budget must be a number in (0, 1]"),
        ]:
            with pytest.raises(ValueError, match=None) as info:
                choose_method(model, *args)
            assert needle in str(info.value), str(info.value)
    finally:
        hook.remove()
    assert not calls


# ------------------------------------------------------------------------------------------------ the pipeline
def _spec(tiny_llava_dir, tiny_tasks, *extra):
    from test_lmms_fixtures import pipeline_overrides

    from vtw.pipeline.config import compose_config, validate_config

    root, names = tiny_tasks
    overrides = pipeline_overrides(tiny_llava_dir, root, [names["gen"]], "logger=none", *extra)
    return validate_config(compose_config(overrides))


def test_config_errors_before_any_weights(tiny_llava_dir, tiny_tasks):
    from vtw.pipeline.config import ConfigError

    for extra, needle in [
        (["vtw.method=auto"], "vtw.method=auto chooses at a compute budget: give vtw.budget=F"),
        (["vtw.method=[vtw,dycoke]", "vtw.budget=0.5"], "vtw.method candidate dycoke with model=tinytest: dycoke"),
        (["vtw.method=[vtw,nope]", "vtw.budget=0.5"], "vtw.method='nope' is not allowed"),
        (["vtw.method=auto", "vtw.budget=0.5", "vtw.keep=0.3"], "vtw.keep does not combine with vtw.method=auto"),
        (["mode=choose", "vtw.budget=0.5"], "mode=choose chooses a method: give vtw.method=auto"),
        (["vtw.method=auto", "vtw.budget=0.5", "vtw.choose.limit=0"], "vtw.choose.limit=0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError) as info:
            _spec(tiny_llava_dir, tiny_tasks, *extra)
        assert needle in str(info.value) and "\n" not in str(info.value), (extra, str(info.value))
    spec = _spec(tiny_llava_dir, tiny_tasks, "vtw.method=auto", "vtw.budget=0.5", "vtw.layer=1")
    assert (
        spec.vtw.method == "auto" and "vtw" in spec.vtw.candidates and "dycoke" not in spec.vtw.candidates
    )  # no video: out


def test_the_cache_is_reused_without_a_forward_and_an_empty_calibration_set_fails(tiny_llava_dir, tiny_tasks,
                                                                                  tmp_path, monkeypatch):  # fmt: skip
    from vtw.pipeline.choose import prepare_choice, run_choose
    from vtw.pipeline.evaluate import build_task_manager, make_model

    monkeypatch.setenv("VTW_CACHE_DIR", str(tmp_path / "cache"))
    spec = _spec(tiny_llava_dir, tiny_tasks, "vtw.method=[vtw,fastv]", "vtw.budget=0.5", "vtw.layer=1",
                 "vtw.choose.limit=2", "dataset.limit=3")  # fmt: skip
    tm = build_task_manager(spec.dataset)
    docs, sources = prepare_choice(spec, tm)
    assert len(docs) == 2 and "after the evaluated ones" in next(iter(sources.values()))["source"]
    first = run_choose(spec, make_model(spec), 1, docs, sources, tmp_path / "a")
    again = run_choose(spec, None, 1, docs, sources, tmp_path / "b")  # a cache hit never touches the model
    assert not first["reused_cache"] and again["reused_cache"] and again["choice"] == first["choice"]
    assert {s["name"] for s in first["choice"]["scores"]} == {"vtw", "fastv"}
    assert (tmp_path / "b" / "choose.json").exists() and (tmp_path / "b" / "choose.png").stat().st_size > 1000
    other = _spec(tiny_llava_dir, tiny_tasks, "vtw.method=[vtw,fastv]", "vtw.budget=0.3", "vtw.layer=1",
                  "vtw.choose.limit=2", "dataset.limit=3")  # fmt: skip
    with pytest.raises(AttributeError):  # another budget: not the cached choice, so it computes (on no model)
        run_choose(other, None, 1, docs, sources)
    whole = _spec(tiny_llava_dir, tiny_tasks, "vtw.method=auto", "vtw.budget=0.5", "vtw.layer=1")
    with pytest.raises(ValueError, match="vtw.method=auto has no calibration prompts"):
        prepare_choice(whole, tm)  # every document evaluated, no validation split


def test_auto_end_to_end_evaluates_the_choice_and_a_choose_job_reuses_it(tiny_llava_dir, tiny_tasks, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """``vtw.method=[vtw,fastv] vtw.budget=0.5`` through ``run_job``: the chosen method is the one evaluated at the
    budget and ``results.json`` records the table; a ``mode=choose`` job with the same settings reuses the cached
    choice, and the sweep summary of both names the chosen method (no loyalty note for the choose-only job)."""
    from test_lmms_fixtures import pipeline_overrides

    from vtw.pipeline.config import compose_config
    from vtw.pipeline.job import JobContext, run_job
    from vtw.pipeline.summary import summarize_sweep

    monkeypatch.setenv("VTW_CACHE_DIR", str(tmp_path / "cache"))
    root, names = tiny_tasks
    common = pipeline_overrides(tiny_llava_dir, root, [names["gen"]], "logger=none", "vtw.method=[vtw,fastv]",
                                "vtw.budget=0.5", "vtw.layer=1", "vtw.choose.limit=2", "dataset.limit=3",
                                "vtw.choose.max_new_tokens=2")  # fmt: skip
    assert run_job(compose_config(common), JobContext(output_dir=tmp_path / "sweep" / "0")).status == "ok"
    results = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    choice = results["choice"]["choice"]
    evaluated = results["result"]
    assert evaluated["method"] == choice["chosen"] in ("vtw", "fastv") and evaluated["budget"] == 0.5
    assert {s["name"] for s in choice["scores"]} == {"vtw", "fastv"} and not results["choice"]["reused_cache"]
    assert (
        run_job(compose_config([*common, "mode=choose"]), JobContext(output_dir=tmp_path / "sweep" / "1")).status
        == "ok"
    )
    again = json.loads((tmp_path / "sweep" / "1" / "choose.json").read_text())
    assert (
        again["reused_cache"] and again["choice"] == choice and not (tmp_path / "sweep" / "1" / "results.json").exists()
    )
    summary = summarize_sweep(tmp_path / "sweep", write=False, plot=False, console=False)
    (row,) = [r for r in summary.rows if r["job"] == "1"]
    assert row["method"] == choice["chosen"] and row["method_label"].startswith("auto: ") and row["budget"] == 0.5
    assert not any("no baseline job" in n for n in summary.notes), summary.notes
