"""mode=analyze: attention probabilities recomputed from q/k == eager attention for every family, the shares and the
migration curve against references computed here (eager weights; the layer search), the verdict by hand, and the
pipeline end to end (files, figures)."""

from __future__ import annotations

import json

import pytest
import torch
from test_withdraw import _vision
from tiny_models import FAMILIES, VIDEO_FAMILIES, Sample, build_tiny_model, make_batch, make_singles

import vtw
from vtw.analysis import Analysis, analyze, analyze_sample, verdict
from vtw.methods.attention import attention_probs
from vtw.search import SearchSettings, search_layer

NUM_LAYERS = 3


def _eager(model, batch) -> tuple[list[tuple], list[torch.Tensor]]:
    """One forward of an eager model: each layer's inputs ``(hidden, position_embeddings)`` and its attention weights
    ``(B, H, T, T)``, as the layers computed them."""
    inputs, weights = [], []
    hooks = []
    for layer in vtw.language_model(model).layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw: inputs.append((a[0] if a else kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True))  # fmt: skip
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1])))
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return inputs, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probs_equal_eager_weights(family):
    model = build_tiny_model(family, attn_implementation="eager", num_layers=NUM_LAYERS)
    samples = [Sample(images=1, videos=int(family in VIDEO_FAMILIES), prefix=3, suffix=4), Sample(prefix=5, suffix=2)]
    batch = make_batch(model, samples)
    real = batch["attention_mask"].bool()
    for layer, (h, pe), w in zip(vtw.language_model(model).layers, *_eager(model, batch)):
        ours = attention_probs(layer, h, pe, batch["attention_mask"])
        rows = real[:, None, :, None].expand_as(ours)  # real query rows only (padding rows are meaningless)
        torch.testing.assert_close(ours[rows], w.float()[rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_shares_and_migration_against_references(family):
    model = build_tiny_model(family, attn_implementation="eager", num_layers=NUM_LAYERS)
    (inputs,) = make_singles(model, [Sample(images=1, prefix=3, suffix=5)])
    got = analyze_sample(model, inputs)
    vision = _vision(model, inputs["input_ids"])[0]
    text_q = ~vision
    text_q[0] = False  # the sink's own row
    for i, w in enumerate(_eager(model, inputs)[1]):
        w = w[0].float()  # (H, T, T)
        to_vision = w[:, text_q][..., vision].sum(-1).mean(-1)
        to_sink = w[:, text_q, 0].mean(-1)
        torch.testing.assert_close(got.text_shares[i, 0], to_vision, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.text_shares[i, 1], to_sink, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.last_shares[i, 0], w[:, -1, vision].sum(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(got.last_map[i], w[:, -1].mean(0), atol=1e-6, rtol=0)
    search = search_layer(model, [inputs], SearchSettings(eta=1.0, min_layer=0))
    assert got.kl.tolist() == pytest.approx([search.kl[k] for k in range(NUM_LAYERS)], rel=1e-6, abs=1e-9)
    assert got.vision_positions == torch.nonzero(vision).flatten().tolist()


def test_aggregate_over_prompts_and_verdict():
    model = build_tiny_model("llava", num_layers=NUM_LAYERS)
    prompts = make_singles(model, [Sample(images=1, prefix=3, suffix=5), Sample(images=1, prefix=2, suffix=3)])
    one = [analyze_sample(model, p) for p in prompts]
    result = analyze(model, prompts)
    stack = torch.stack([s.text_shares for s in one])  # (2, L, 3, H)
    mean = stack[:, :, 0].permute(1, 0, 2).reshape(NUM_LAYERS, -1).double().mean(-1)
    assert result.text_shares["vision_mean"] == pytest.approx(mean.tolist())
    assert result.kl == pytest.approx(torch.stack([s.kl for s in one]).double().mean(0).tolist())
    hand = Analysis(num_layers=4, samples=3, text_shares={"vision_mean": [0.5, 0.2, 0.03, 0.01]},
                    kl=[3.0, 0.1, 0.002, 0.001])  # fmt: skip
    assert verdict(hand, eta=0.003) == (
        "vision share of text queries' attention stays below 5% from layer 2 on; KL <= eta=0.003 from layer 2 "
        "(3 prompts)"
    )
    hand.text_shares["vision_mean"] = [0.5, 0.02, 0.2, 0.01]
    assert "rises again at layer(s) 2" in verdict(hand, eta=0.003)
    with pytest.raises(ValueError, match="no prompts"):
        analyze(model, [])


def test_mode_analyze_end_to_end(tiny_llava_dir, tiny_tasks, tmp_path):
    from test_lmms_fixtures import pipeline_overrides

    from vtw.pipeline.config import compose_config
    from vtw.pipeline.job import JobContext, run_job

    root, names = tiny_tasks
    cfg = compose_config([*pipeline_overrides(tiny_llava_dir, root, [names["gen"]]), "mode=analyze", "analyze.limit=3",
                          "logger.mode=offline"])  # fmt: skip
    outcome = run_job(cfg, JobContext(output_dir=tmp_path))
    assert outcome.status == "ok"
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["samples"] == 3 and len(data["kl"]) == data["num_layers"] == len(data["text_shares"]["vision_mean"])
    assert data["verdict"].endswith("(3 prompts)")
    for name in ("attention_share.png", "migration.png", "attention_map.png"):
        assert (tmp_path / name).stat().st_size > 5000
    from wandb_offline import find_offline_runs, read_offline_run

    (run,) = [read_offline_run(r) for r in find_offline_runs(tmp_path / "wandb")]
    assert run.summary["verdict"] == data["verdict"] and "analysis" in run.tables
