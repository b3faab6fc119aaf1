"""The method layer: the registry, method objects, and the shared mechanism with several stages.

The multi-stage mechanism is checked with a two-stage method written here (stage 1 keeps the vision tokens at even
input positions, stage 2 the first two vision tokens left; not in the registry, so not in the conformance suite): each
stage keeps what the test's own rule keeps, the method sees what the rule says, and cached generation on that choice
== the shared naive reference (tests/reference.py: decoder layers by hand without a cache, recomputed at every step).
Batch == alone and the KV caches of registered multi-stage methods are the conformance suite's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from reference import naive_generate, stage_choices
from test_withdraw import _model, _prompt, _vision
from tiny_models import Sample, make_batch, make_singles

import vtw
from vtw import withdraw
from vtw.methods import METHODS, RandomTokens, Reduction, StageContext, Withdrawal, make_method, method_params

NUM_LAYERS = 4
STAGES = (1, 3)
ATOL = 1e-4


@dataclass(frozen=True)
class EvenThenFirstTwo(Reduction):
    """Stage 0 (layer 1): keep text and the vision tokens at even input positions. Stage 1 (layer 3): keep text and
    the first two vision tokens still present."""

    name = "even_then_two"
    seen: list = field(default_factory=list, compare=False)  # (stage, positions, vision) of each prefill stage

    def stages(self):
        return STAGES

    def select(self, ctx: StageContext) -> torch.Tensor:
        self.seen.append((ctx.stage, ctx.positions.clone(), ctx.vision.clone()))
        if ctx.stage == 0:
            return ~ctx.vision | (ctx.positions % 2 == 0)
        first_two = (ctx.vision.long().cumsum(1) <= 2) & ctx.vision
        return ~ctx.vision | first_two

    def stage_tokens(self, stage, vision, text):
        return ((vision + 1) // 2 if stage == 0 else min(vision, 2)), text


def _reference_keep(vision_row: torch.Tensor, alive: torch.Tensor, stage: int) -> torch.Tensor:
    """The test's own rule over the input positions still ``alive`` (1-D long): which of them stay."""
    is_vision = vision_row[alive]
    if stage == 0:
        stays = ~is_vision | (alive % 2 == 0)
    else:
        order = torch.cumsum(is_vision.long(), 0)
        stays = ~is_vision | (order <= 2)
    stays[-1] = True  # the last token is always kept
    return alive[stays]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_two_stages_with_cache_match_naive_reference(family, attn):
    model = _model(family, attn)
    (inputs,) = make_singles(model, _prompt(family))
    vision = _vision(model, inputs["input_ids"])[0]
    assert vision.sum() > 4
    method = EvenThenFirstTwo()
    with torch.no_grad(), withdraw(model, method=method) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    # each stage keeps what the test's rule keeps; the method saw every input position at stage 0, the survivors
    # (input positions) at stage 1
    everything = torch.arange(vision.numel())
    survivors = _reference_keep(vision, everything, 0)
    assert [r.layer for r in handle.last_stages] == list(STAGES)
    for record, expected in zip(handle.last_stages, (survivors, _reference_keep(vision, survivors, 1))):
        assert torch.equal(record.keep_index[0], expected) and not record.extra.any()
    assert [stage for stage, _, _ in method.seen] == [0, 1]
    for (_, positions, seen_vision), expected in zip(method.seen, (everything, survivors)):
        assert torch.equal(positions[0], expected) and torch.equal(seen_vision[0], vision[expected])
    ref_tokens, ref_logits = naive_generate(model, inputs, stage_choices(handle.last_stages), 4)
    assert out.sequences[0, inputs["input_ids"].shape[1] :].tolist() == ref_tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], ref_logits, atol=ATOL, rtol=0)


def test_registry_and_method_objects():
    assert set(METHODS) >= {"vtw", "random"}
    for name in vtw.method_names():  # every name the config and withdraw() accept builds from its defaults alone
        method = make_method(name).resolve(8)
        assert type(method) is METHODS[name] and isinstance(method.label, str) and method.label.startswith(name)
    assert method_params("vtw") == ("layer",) and method_params("random") == ("layer", "seed")
    assert make_method("vtw", layer=3) == Withdrawal(layer=3)
    assert make_method("random", layer=2, seed=5) == RandomTokens(layer=2, seed=5)
    assert {"vtw", "fastv", "pdrop", "pool", "random", "random_vision", "visionzip"} <= set(METHODS)
    allowed = ", ".join(["vtw", *sorted(set(METHODS) - {"vtw"})])  # vtw first, then the others by name
    with pytest.raises(ValueError, match=f"unknown withdrawal method .fast.; allowed: {allowed}$"):
        make_method("fast")
    with pytest.raises(ValueError, match=r"method 'vtw' takes layer; got unknown keep"):
        make_method("vtw", layer=2, keep=0.5)
    with pytest.raises(ValueError, match="random seed must be an integer >= 0, got -1"):
        RandomTokens(layer=1, seed=-1)
    with pytest.raises(ValueError, match=r"withdrawal layer 9 is out of range: allowed 0..8"):
        Withdrawal(layer=9).resolve(8)
    assert Withdrawal(layer=3).label == "vtw K=3" and Withdrawal().label == "vtw"
    assert Withdrawal().stages() == () and Withdrawal(layer=2).stages() == (2,)


def test_layer_tokens_hand_derived():
    # VTW at K=2 of 4 layers, 10 vision + 5 text: layers 0, 1 see 15 tokens, layers 2, 3 the 5 text tokens
    assert Withdrawal(layer=2).layer_tokens(4, 10, 5) == [(10, 5), (10, 5), (0, 5), (0, 5)]
    assert Withdrawal(layer=4).layer_tokens(4, 10, 5) == [(10, 5)] * 4  # K = L: untouched
    assert Withdrawal().layer_tokens(4, 10, 5) == [(10, 5)] * 4
    # the ablation drops as many tokens as there are vision tokens, never the last one
    assert [sum(c) for c in RandomTokens(layer=1).layer_tokens(3, 10, 5)] == [15, 5, 5]
    assert [sum(c) for c in RandomTokens(layer=0).layer_tokens(2, 4, 0)] == [1, 1]
    # the test's two-stage method: 7 vision -> 4 -> 2
    assert EvenThenFirstTwo().layer_tokens(4, 7, 3) == [(7, 3), (4, 3), (4, 3), (2, 3)]


def test_method_object_and_layer_together_is_an_error():
    model = _model("llava", "sdpa")
    with pytest.raises(ValueError, match="give the layer to the method object"):
        withdraw(model, 2, method=Withdrawal(layer=1))
    handle = withdraw(model, method=Withdrawal(layer=1))
    assert handle.active and handle.stages == (1,) and handle.label == "vtw K=1"
    handle.remove()


def test_every_method_file_is_in_the_registry():
    """Adding a method is its file: the registry lists every class of vtw/methods/ that sets a `name` (read here from
    the sources with ast), except the callable-built `custom`."""
    import ast
    from pathlib import Path

    import vtw.methods as pkg

    names = set()
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["name"]:
                        names.add(stmt.value.value)
    names -= {"", "custom"}
    assert set(METHODS) == names and next(iter(METHODS)) == "vtw"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_random_ablation_draws_per_sample(family):
    """The paper's ``random`` ablation in a left-padded batch (two image prompts of different lengths, a text-only
    prompt): each sample drops exactly what the test's own draw for it alone drops (a generator seeded ``seed``,
    ``randperm`` over its real tokens but the last, the first ``V`` of them). (That the batch then generates what each
    sample alone generates is the conformance suite's.)"""
    model = _model(family, "sdpa")
    samples = [Sample(images=1, prefix=3, suffix=6), Sample(prefix=9, suffix=4), Sample(images=1, prefix=1, suffix=2)]
    batch = make_batch(model, samples)
    assert (batch["attention_mask"] == 0).any()
    seed = 3
    with torch.no_grad(), withdraw(model, 1, method="random", seed=seed) as handle:
        model(**batch)
        kept_in_batch = handle.last_keep_index.clone()
    for i, single in enumerate(make_singles(model, samples)):
        n = single["input_ids"].shape[1]
        v = int(_vision(model, single["input_ids"]).sum())
        drop = torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[:v]
        expected = torch.tensor([p for p in range(n) if p not in set(drop.tolist())])
        offset = batch["input_ids"].shape[1] - n  # left padding
        row = kept_in_batch[i][kept_in_batch[i] >= 0]
        assert torch.equal(row - offset, expected), i
