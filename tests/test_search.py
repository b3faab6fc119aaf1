"""KL layer search: equals a brute-force search with one withdrawn forward per candidate, every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, VIDEO_FAMILIES, Sample, build_tiny_model, make_batch, make_singles

from vtw import withdraw
from vtw.search import SearchResult, SearchSettings, default_min_layer, search_layer

L = 4


def _brute_force_kl(model, inputs: dict, k: int) -> torch.Tensor:
    """KL(P_K || P_full) of the last prompt position, from two ordinary forwards (the reference's direction)."""
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        with withdraw(model, k):
            part = model(**inputs).logits[:, -1]
    # torch's kl_div(input=log q, target=p) = sum p (log p - log q): p = P_K, q = P_full
    return torch.nn.functional.kl_div(
        torch.log_softmax(full.double(), -1), torch.log_softmax(part.double(), -1), log_target=True, reduction="none"
    ).sum(-1)


def _samples(family):
    extra = [Sample(videos=1, prefix=2, suffix=3)] if family in VIDEO_FAMILIES else []
    return [Sample(images=1, prefix=3, suffix=4), Sample(images=1, prefix=5, suffix=2), *extra]


@pytest.mark.parametrize("family", FAMILIES)
def test_search_equals_brute_force(family):
    model = build_tiny_model(family, num_layers=L)
    singles = make_singles(model, _samples(family))
    brute = {k: torch.stack([_brute_force_kl(model, s, k)[0] for s in singles]).mean().item() for k in range(1, L + 1)}
    # choose eta between two brute-force values so the choice is not at an edge
    values = sorted(brute[k] for k in range(1, L))
    eta = (values[0] + values[1]) / 2 if values[1] > values[0] else values[0] * 1.01 + 1e-12
    expected = next((k for k in range(1, L) if brute[k] <= eta), None)
    result = search_layer(model, singles, SearchSettings(eta=eta, min_layer=1))
    for k in range(1, L + 1):
        assert result.kl[k] == pytest.approx(brute[k], rel=1e-3, abs=1e-9), f"K={k}"
    assert result.kl[L] == pytest.approx(0.0, abs=1e-9)
    assert result.layer == expected
    assert result.num_samples == len(singles)


def test_batched_search_equals_per_sample():
    model = build_tiny_model("llava", num_layers=L)
    samples = [Sample(images=1, prefix=3, suffix=4), Sample(images=2, prefix=1, suffix=6), Sample(prefix=4, suffix=2)]
    settings = SearchSettings(eta=1e-3, min_layer=1)
    one = search_layer(model, make_singles(model, samples), settings)
    batched = search_layer(model, [make_batch(model, samples)], settings)
    for k in one.kl:
        assert batched.kl[k] == pytest.approx(one.kl[k], rel=1e-3, abs=1e-9)


def test_no_candidate_meets_eta_falls_back_to_no_withdrawal():
    model = build_tiny_model("llava", num_layers=L)
    singles = make_singles(model, _samples("llava"))
    result = search_layer(model, singles, SearchSettings(eta=1e-300, min_layer=1))
    assert result.layer is None and not result.met
    assert "no layer" in result.message and "no withdrawal" in result.message


def test_forward_direction_differs_and_roundtrip():
    model = build_tiny_model("qwen2_vl", num_layers=L)
    singles = make_singles(model, _samples("qwen2_vl"))
    ref = search_layer(model, singles, SearchSettings(eta=0.01, min_layer=1))
    fwd = search_layer(model, singles, SearchSettings(eta=0.01, min_layer=1, direction="forward"))
    assert ref.kl[1] != pytest.approx(fwd.kl[1], rel=1e-6)
    assert SearchResult.from_dict(ref.to_dict()) == ref


@pytest.mark.parametrize(
    "settings, match",
    [
        (SearchSettings(eta=0.0), "eta must be a number > 0, got 0.0"),
        (SearchSettings(eta=-1), "eta must be a number > 0, got -1"),
        (SearchSettings(eta=0.1, min_layer=L), f"min_layer {L} is out of range: allowed 0..{L - 1}"),
        (SearchSettings(eta=0.1, min_layer=-2), "min_layer -2 is out of range"),
        (SearchSettings(eta=0.1, direction="sideways"), "direction 'sideways' is unknown"),
        (SearchSettings(eta=0.1, min_layer=2, max_layer=1), "max_layer 1 is out of range: allowed 2..3"),
    ],
)
def test_bad_settings(settings, match):
    model = build_tiny_model("llava", num_layers=L)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        search_layer(model, make_singles(model, _samples("llava")), settings)
    assert not calls


def test_max_layer_limits_the_candidates():
    model = build_tiny_model("llava", num_layers=L)
    singles = make_singles(model, _samples("llava"))
    result = search_layer(model, singles, SearchSettings(eta=1e9, min_layer=2, max_layer=2))
    assert sorted(result.kl) == [2, L] and result.layer == 2


def test_default_min_layer_scales_like_the_reference():
    assert default_min_layer(32) == 5  # the reference's start for 32-layer models
    assert default_min_layer(40) == 6
    assert default_min_layer(8) == 1
    assert default_min_layer(2) == 1
