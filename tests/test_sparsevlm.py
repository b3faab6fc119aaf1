"""SparseVLM: each stage's choice (raters, scores, rank-based count, recycled aggregates) against a naive reference in
plain loops, exact under KV-cache decoding and batching, decided from the prompt alone, hand-derived counts, exact
scoring FLOPs, clear errors.

The naive reference runs the decoder layers by hand on one sample (no cache) and makes SparseVLM's choice at each
stage from what it computes itself: the raters from dot products of the scoring layer's input, the scores from that
layer's *eager* attention weights (the model's own ``output_attentions`` path: the method under test recomputes them
from the weights), the count from the paper's rule, the recycled tokens and their density-peak clusters in loops.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import reference
import torch
from test_withdraw import _extend, _vision
from tiny_models import Sample, build_tiny_model, make_batch, make_singles

from vtw import language_model, withdraw
from vtw.methods import make_method
from vtw.methods.base import LayerInput, Merge, StageContext
from vtw.methods.sparsevlm import SparseVLM

NUM_LAYERS = 4
STEPS = 3
ATOL = 1e-4
FAMILIES = ("llava", "qwen2_vl")
#: the paper's defaults, and a setting that recycles every pruned token into several clusters (DPC at work)
SETTINGS = (SparseVLM(), SparseVLM(layers=(0, 1, 2), keep=(0.4, 0.6, 0.5), recycle=1.0, clusters=0.5))


@cache
def _model(family: str, attn: str):
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    model.generation_config.eos_token_id = None
    return model


def _sample(family: str) -> Sample:
    """One prompt with many vision tokens: two LLaVA images (16 each), one larger Qwen image."""
    return Sample(images=2, prefix=3, suffix=7) if family == "llava" else Sample(images=1, prefix=3, suffix=7,
                                                                                  image_shape=(56, 56))  # fmt: skip


# ---------------------------------------------------------------------------------------------- the naive reference
def _rope(lm, h: torch.Tensor, positions: torch.Tensor):
    """``((cos, sin), position ids)`` the decoder's layers take at ``positions`` (Qwen's 4-row M-RoPE ids: rows 1..3)."""
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]
    return lm.rotary_emb(h, positions), positions


def _eager_attention(layer, h: torch.Tensor, rope) -> torch.Tensor:
    """``(H, n, n)``: the layer's own eager attention probabilities on its input ``h`` ``(1, n, D)``."""
    normed = layer.input_layernorm(h)
    _, weights = layer.self_attn(hidden_states=normed, position_embeddings=rope[0], position_ids=rope[1],
                                 attention_mask=reference.causal_mask(h.shape[1], h.dtype))  # fmt: skip
    return weights[0]


def _naive_raters(x: torch.Tensor, vision: list[int], candidates: list[int]) -> list[int]:
    """Candidates whose relevance (mean over vision tokens of the softmax over candidates of ``x_v · x_t``) is above
    the candidates' mean; every candidate if none is."""
    relevance = dict.fromkeys(candidates, 0.0)
    for v in vision:
        dots = [float(x[v] @ x[c]) for c in candidates]
        top = max(dots)
        weights = [math.exp(d - top) for d in dots]
        for c, w in zip(candidates, weights):
            relevance[c] += w / sum(weights) / len(vision)
    mean = sum(relevance.values()) / len(candidates)
    return [c for c in candidates if relevance[c] > mean] or candidates


def _naive_clusters(rows: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Density-peak clustering of ``rows`` into ``count`` means, centres by decreasing density x parent distance."""
    m, dim = len(rows), rows[0].numel()
    d = [[float((rows[i] - rows[j]).norm()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(d[i])[:count]) / count) for i in range(m)]
    far = max(max(r) for r in d)
    parent = [min([d[i][j] for j in range(m) if density[j] > density[i]], default=far) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-parent[i] * density[i], i))[:count]
    groups = {c: [c] for c in centres}
    for i in range(m):
        if i not in groups:
            groups[min(centres, key=lambda c: (d[c][i], centres.index(c)))].append(i)
    return [torch.stack([rows[i] for i in groups[c]]).mean(0) for c in centres]


def _naive_choice(method, share, weights, h_in, h_out, vis: list[bool], q: int):
    """``(kept columns, [aggregate values], anchor column)`` of one stage over the ``n`` tokens present."""
    vision = [i for i, flag in enumerate(vis) if flag and i < q]
    candidates = [i for i in range(vision[0] + 1, q + 1) if not vis[i]] if vision else []
    if not candidates:
        return list(range(len(vis))), [], None
    raters = _naive_raters(h_in[0].double(), vision, candidates)
    matrix = [[float(weights[:, r, v].mean()) for v in vision] for r in raters]
    score = {v: sum(row[j] for row in matrix) / len(raters) for j, v in enumerate(vision)}
    rank = int(torch.linalg.matrix_rank(torch.tensor(matrix, dtype=torch.float32)))
    n_keep = len(vision) - math.floor((1 - share) * (len(vision) - rank) + 1e-9)
    order = sorted(vision, key=lambda v: (-score[v], v))
    kept, pruned = order[:n_keep], order[n_keep:]
    keep = sorted(set(range(len(vis))) - set(pruned))
    m = min(len(pruned), math.floor(method.recycle * len(pruned) + 1e-9) + 1) if pruned and method.recycle else 0
    if not m:
        return keep, [], None
    rows = [h_out[0, i].double() for i in pruned[:m]]
    return keep, _naive_clusters(rows, min(m, math.floor(method.clusters * m + 1e-9) + 1)), max(kept)


def naive_run(model, inputs: dict, method: SparseVLM, check=None) -> dict:
    """The decoder by hand on one sample's prompt with SparseVLM's choice made by :func:`_naive_choice`.

    Returns ``{"stages": [(input columns (n,), added (n,) bool, values (1, n, D) the stage's layer gets)], "tokens":
    [(v, t)] per layer, "logits": (V,) of the last token}``;
    ``check(ctx, kept columns, aggregates, anchor)`` is called at each stage with the method's view of it.
    """
    lm = language_model(model)
    embeds, positions = reference.decoder_inputs(model, inputs)
    n = embeds.shape[1]
    q = n - 1  # the query: the last prompt token
    h, cols, vis = embeds, list(range(n)), _vision(model, inputs["input_ids"])[0].tolist()
    added = [False] * n
    stage_of = {k: s for s, k in enumerate(method.stages())}
    out = {"stages": [], "tokens": []}
    prev = None
    for i, layer in enumerate(lm.layers):
        rope = _rope(lm, h, positions[..., cols])
        if i in stage_of:
            qi = next(j for j, (c, a) in enumerate(zip(cols, added)) if c == q and not a)
            share = method.keep[stage_of[i]]
            keep, aggs, anchor = _naive_choice(method, share, _eager_attention(lm.layers[i - 1], *prev), prev[0], h,
                                               vis, qi)  # fmt: skip
            if check is not None:
                ctx = StageContext(stage=stage_of[i], layer=i, hidden=h, vision=torch.tensor([vis]),
                                   attention_mask=torch.ones(1, len(cols), dtype=torch.long),
                                   positions=torch.tensor([cols]), module=layer, position_embeddings=rope[0],
                                   previous=LayerInput(lm.layers[i - 1], prev[0], prev[1][0]),
                                   input_vision=torch.tensor([sum(vis)]), query=torch.tensor([qi]))  # fmt: skip
                check(ctx, keep, aggs, anchor)
            order = [(j, None) for j in keep]
            if aggs:
                at = order.index((anchor, None)) + 1
                order[at:at] = [(anchor, e) for e in range(len(aggs))]
            h = torch.cat([h[:, j] if e is None else aggs[e][None].to(h) for j, e in order])[None]
            cols, vis = [cols[j] for j, _ in order], [vis[j] or e is not None for j, e in order]
            added = [added[j] or e is not None for j, e in order]
            out["stages"].append((torch.tensor(cols), torch.tensor(added), h))
            rope = _rope(lm, h, positions[..., cols])
        out["tokens"].append((sum(vis), len(vis) - sum(vis)))
        prev = (h, rope)
        h = layer(h, attention_mask=reference.causal_mask(h.shape[1], h.dtype), position_embeddings=rope[0],
                  position_ids=rope[1], past_key_values=None, use_cache=False)  # fmt: skip
    out["logits"] = model.lm_head(lm.norm(h))[0, -1]
    return out


def _method_view(method: SparseVLM, ctx: StageContext):
    """``(kept columns, aggregates (c, D) or None, anchor columns (c,))`` of ``method.select(ctx)`` (one sample)."""
    picked = method.select(ctx)
    keep, extra = (picked.keep, picked.extra) if isinstance(picked, Merge) else (picked, None)
    if isinstance(picked, Merge):
        assert picked.hidden is None  # kept tokens keep their values
    cols = torch.nonzero(keep[0]).flatten().tolist()
    if extra is None:
        return cols, None, None
    valid = extra.valid[0]
    return cols, extra.hidden[0][valid], extra.after[0][valid]


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_stage_matches_the_naive_reference(family, setting):
    """At every stage (aggregates of earlier stages present) the method keeps the naive reference's columns and adds
    its aggregates, with its values, after its anchor; the counts follow the rank, not only the share."""
    model = _model(family, "eager")
    method = SETTINGS[setting].resolve(NUM_LAYERS)
    (inputs,) = make_singles(model, [_sample(family)])
    seen = []

    def check(ctx, keep, aggs, anchor):
        cols, values, after = _method_view(method, ctx)
        assert cols == keep, f"stage {ctx.stage}"
        if not aggs:
            assert values is None
        else:
            assert after.tolist() == [anchor] * len(aggs)
            torch.testing.assert_close(values.double(), torch.stack(aggs), atol=1e-5, rtol=0)
        share = method.keep[ctx.stage]
        seen.append((int(ctx.vision.sum()), len(keep) - int((~ctx.vision).sum()), len(aggs), share))

    with torch.no_grad():
        naive_run(model, inputs, method, check=check)
    assert len(seen) == 3
    # the rank keeps more than the share alone would, and at least one stage forms several clusters
    assert any(kept > math.ceil(share * v) for v, kept, _, share in seen), seen
    assert any(c > 0 for *_, c, _ in seen)
    if setting == 1:
        assert any(c >= 2 for *_, c, _ in seen), seen


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_matches_naive_recompute(family):
    """Through ``withdraw`` (SDPA, KV cache): each stage's record is the naive reference's choice (columns, added
    tokens, their values), the realized counts are its counts, and a cached greedy generate equals the shared naive
    decoder recomputing everything at each step."""
    model = _model(family, "sdpa")
    method = SETTINGS[1]
    (inputs,) = make_singles(model, [_sample(family)])
    with torch.no_grad():
        naive = naive_run(_model(family, "eager"), inputs, method.resolve(NUM_LAYERS))
        with withdraw(model, method=method) as handle:
            handle.record_hidden = True
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)  # fmt: skip
    assert handle.stages == (1, 2, 3)
    for s, (rec, (cols, added, hidden)) in enumerate(zip(handle.last_stages, naive["stages"])):
        real = rec.keep_index[0] >= 0
        assert rec.keep_index[0][real].tolist() == cols.tolist(), f"stage {s}"
        assert rec.extra[0][real].tolist() == added.tolist(), f"stage {s}"
        torch.testing.assert_close(rec.hidden[0][real], hidden[0], atol=ATOL, rtol=0, msg=f"stage {s}")
    realized = handle.last_layer_tokens[0].tolist()
    assert realized == [list(t) for t in naive["tokens"]]
    declared = method.layer_tokens(NUM_LAYERS, *realized[0])  # rank 0: a lower bound, exceeded by the rank
    assert all(d[1] == r[1] and d[0] <= r[0] for d, r in zip(declared, realized)) and declared != realized
    choices = reference.stage_choices(handle.last_stages)
    tokens, logits = reference.naive_generate(model, inputs, choices, STEPS)
    n = inputs["input_ids"].shape[1]
    assert out.sequences[0, n:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[0], naive["logits"], atol=ATOL, rtol=0)


def _records(handle, row: int) -> list[tuple[list[int], list[bool], torch.Tensor]]:
    """Each stage's ``(input columns, added flags, values)`` of sample ``row`` (packing padding dropped)."""
    out = []
    for rec in handle.last_stages:
        real = rec.keep_index[row] >= 0
        out.append((rec.keep_index[row][real].tolist(), rec.extra[row][real].tolist(), rec.hidden[row][real]))
    return out


def _same_records(a, b, what: str, shift: int = 0) -> None:
    """Stage records ``a`` and ``b`` equal; ``shift``: ``b``'s columns are ``a``'s plus it (left padding)."""
    assert len(a) == len(b), what
    for s, ((ca, ea, ha), (cb, eb, hb)) in enumerate(zip(a, b)):
        assert [c + shift for c in ca] == cb and ea == eb, f"{what}, stage {s}"
        torch.testing.assert_close(ha, hb, atol=ATOL, rtol=0, msg=f"{what}, stage {s}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(family):
    """Left padding, a text-only sample and samples with different vision counts: each sample's stages (kept
    columns, aggregates, values) and greedy tokens are what it gets alone."""
    model = _model(family, "sdpa")
    samples = [_sample(family), Sample(prefix=6, suffix=3), Sample(images=1, prefix=2, suffix=4)]
    batch = make_batch(model, samples)
    assert (batch["attention_mask"] == 0).any()
    method = SETTINGS[1]
    with torch.no_grad(), withdraw(model, method=method) as handle:
        handle.record_hidden = True
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        together = [_records(handle, b) for b in range(len(samples))]
        counts = handle.last_layer_tokens
        logits = torch.stack(out.logits, 1)
        width = batch["input_ids"].shape[1]
        for b, single in enumerate(make_singles(model, samples)):
            alone = model.generate(**single, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)  # fmt: skip
            shift = width - single["input_ids"].shape[1]
            _same_records(_records(handle, 0), together[b], f"sample {b}", shift)
            assert torch.equal(handle.last_layer_tokens[0], counts[b])
            assert out.sequences[b, width:].tolist() == alone.sequences[0, -STEPS:].tolist()
            torch.testing.assert_close(logits[b], torch.stack(alone.logits, 1)[0], atol=ATOL, rtol=0)
    assert counts[1, :, 0].tolist() == [0] * NUM_LAYERS  # the text-only sample: nothing to rate, nothing added


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_only_decides_from_the_prompt(family):
    """Prompt + continuation under ``prompt_only``: every stage keeps and adds what the prompt alone gets (raters,
    vision tokens and scores from columns up to the last prompt token), and the continuation goes on whole."""
    model = _model(family, "sdpa")
    (prompt,) = make_singles(model, [_sample(family)])
    n = prompt["input_ids"].shape[1]
    full = prompt
    for token in (7, 8, 9, 10):
        full = _extend(full, token)
    with torch.no_grad(), withdraw(model, method=SETTINGS[1]) as handle:
        handle.record_hidden = True
        model(**prompt)
        alone = _records(handle, 0)
        with handle.prompt_only(torch.tensor([n - 1])):
            model(**full)
        scored = _records(handle, 0)
    for s, ((ca, ea, ha), (cb, eb, hb)) in enumerate(zip(alone, scored)):
        assert cb[: len(ca)] == ca and cb[len(ca) :] == list(range(n, n + 4)) and eb[: len(ea)] == ea, f"stage {s}"
        torch.testing.assert_close(hb[: len(ca)], ha, atol=ATOL, rtol=0)
    # without prompt_only the continuation rates too: the choice changes
    with torch.no_grad(), withdraw(model, method=SETTINGS[1]) as handle:
        model(**full)
        assert [r.keep_index[0].tolist()[: len(a[0])] for r, a in zip(handle.last_stages, alone)] != [
            a[0] for a in alone
        ]


def test_expected_counts_derived_by_hand():
    """``V - floor((1 - keep)(V - rank))`` kept, ``floor(0.3 n) + 1`` of the ``n`` pruned recycled into
    ``floor(0.1 m) + 1`` aggregates; expected counts take rank 0."""
    method = SparseVLM()
    # 576 -> 288 kept + 9 aggregates (288 pruned, 87 recycled) = 297 -> 149 + 5 (148, 45) = 154 -> 77 + 3 (77, 24) = 80
    assert [method.stage_tokens(s, v, 40) for s, v in ((0, 576), (1, 297), (2, 154))] == [(297, 40), (154, 40),
                                                                                          (80, 40)]  # fmt: skip
    assert method.layer_tokens(32, 576, 40) == [(576, 40)] * 3 + [(297, 40)] * 4 + [(154, 40)] * 9 + [(80, 40)] * 16
    assert method.resolve(32).stages() == (3, 7, 16) and method.resolve(28).layers == (2, 5, 13)
    assert method.resolve(4).stages() == (1, 2, 3)
    assert method.kept_vision(0, 16, rank=3) == 10 and method.kept_vision(0, 16, rank=16) == 16  # 16 - floor(6.5)
    assert (method.recycled(0), method.recycled(1), method.recycled(3), method.recycled(10)) == (0, 1, 1, 4)
    assert (method.aggregates(29), method.aggregates(30), method.aggregates(70)) == (1, 2, 3)  # m = 9, 10, 22
    none = SparseVLM(recycle=0.0)
    assert none.recycled(100) == 0 and none.stage_tokens(0, 576, 40) == (288, 40)
    assert SparseVLM(recycle=1.0, clusters=1.0).aggregates(5) == 5  # at most one aggregate per recycled token
    assert SparseVLM(keep=(1.0, 0.5, 1.0)).resolve(32).stages() == (7,)  # keep=1 stages are not installed
    assert SparseVLM(keep=(1.0, 1.0, 1.0)).layer_tokens(32, 576, 40) == [(576, 40)] * 32


COUNTED: list = []
_Counted = reference.counting(SparseVLM, COUNTED)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_flops_equal_flop_counter(family):
    """What ``select`` spends (FlopCounterMode, one sample, every stage) is ``scoring_flops`` of the realized counts,
    and what ``count_flops`` books as the prefill's reduction work."""
    from vtw.flops import SampleCounts, count_flops

    model = _model(family, "sdpa")
    for sample, params in ((_sample(family), dict(recycle=1.0, clusters=0.5)), (Sample(prefix=5), {})):
        (inputs,) = make_singles(model, [sample])
        method = _Counted(**params)
        tokens = reference.counted_prefill(model, inputs, method, COUNTED)
        expected = method.scoring_flops(model.config, None, tokens)
        assert len(COUNTED) == 3 and sum(COUNTED) == expected
        assert (expected > 0) == (sample.images > 0)
        vision, text = tokens[0]
        grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else None
        report = count_flops(
            model.config,
            SampleCounts(vision_tokens=vision, text_tokens=text, vision_grids=grids),
            method,
            layer_tokens=tokens,
        )
        assert report.prefill.reduction == expected


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(keep=(0.5, 0)), "sparsevlm keep must be a number in (0, 1]"),
        (dict(keep=()), "sparsevlm keep must be a non-empty list"),
        (dict(recycle=1.5), "sparsevlm recycle must be a number in [0, 1], got 1.5"),
        (dict(recycle=True), "sparsevlm recycle must be a number in [0, 1], got True"),
        (dict(clusters=0), "sparsevlm clusters must be a number in (0, 1], got 0"),
        (dict(layers=(2, 6)), "sparsevlm layers [2, 6] and keep [0.5, 0.5, 0.5] must have the same length"),
        (dict(layers=(2, 2, 5)), "sparsevlm layers must be strictly increasing, got [2, 2, 5]"),
        (dict(layers=(1, "6", 9)), "sparsevlm layers must be integers"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SparseVLM(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("method", "num_layers", "needle"),
    [
        (SparseVLM(layers=(1, 2, 3)), 4, "sparsevlm layers [1, 2, 3] are out of range: allowed 0..2 (L=4"),
        (SparseVLM(), 2, "sparsevlm: the default layers do not fit L=2; give layers=... explicitly"),
        (SparseVLM(keep=(0.5,)), 32, "sparsevlm with 1 keep shares needs its layers"),
    ],
)
def test_layers_are_checked_against_the_decoder(method, num_layers, needle):
    with pytest.raises(ValueError) as err:
        method.resolve(num_layers)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="out of range"):  # withdraw checks it before any forward
        withdraw(_model("llava", "sdpa"), method="sparsevlm", layers=(0, 1, 3))


def test_registry_budget_candidates_and_label():
    method = make_method("sparsevlm", keep=(0.5, 0.25, 0.5), recycle=0.2)
    assert isinstance(method, SparseVLM) and method.label == (
        "sparsevlm L=auto keep=0.5,0.25,0.5 recycle=0.2 clusters=0.1"
    )
    cands = method.budget_candidates(32)
    compute = [sum(v for v, _ in c.layer_tokens(32, 576, 40)) for c in cands]
    assert compute == sorted(compute) and compute[0] < compute[-1]
    assert cands[-1].keep == (1.0, 1.0, 1.0) and all(c.recycle == 0.2 for c in cands)
    assert SparseVLM.free_parameter == "scale"
