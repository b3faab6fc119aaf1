"""Conformance: every registered method (:data:`vtw.methods.METHODS`) on a tiny model of every supported family.

No list of methods or settings here: each method runs at a *reducing* setting and at its *no-op* settings, both
derived from the registry, so a new method file is covered without editing this one. Reducing: the class's defaults
if they reduce the prompt with some layer seeing vision tokens (by ``layer_tokens``), else, of the
:meth:`~vtw.methods.Reduction.budget_candidates` that do, the first at the median of their distinct total counts.
No-op: the defaults, the first and the last budget candidate that install nothing (no stage before ``L``, or
``acts_on`` false); a method with none is skipped there. A pair the method refuses (``check_supported`` raises) is skipped
with its one-line reason (tests/test_method_refusals.py checks the refusals themselves). Properties:

1. greedy ``generate`` with the KV cache == the naive reference (tests/reference.py: no cache, the prefill's choice
   kept, every new token kept), same tokens and logits within ``ATOL``, eager and SDPA, and with
   ``positions="compact"`` where the family allows it; the stage records carry the values the method returned;
2. a left-padded batch (different image counts, a text-only row, a video where the method takes one) == each sample
   alone, eager and SDPA;
3. a no-op setting installs nothing and is bit-identical to the model; ``remove()`` after a reducing run restores the
   model bit for bit and takes every hook and instance attribute away;
4. FLOPs: ``FlopCounterMode`` over a real ``generate`` == :func:`vtw.flops.count_flops` fed the run's realized
   per-layer token counts, component by component, prefill and decode;
5. each decoder layer's KV cache holds the realized tokens of that layer (``handle.last_layer_tokens``), which are
   what the stage records say; each decode step adds one token to every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import pytest
import torch
from reference import decoder_inputs, naive_generate, stage_choices
from test_flops import _measure, _phase, _phase_with_reduction, _token_counts, _workload
from tiny_models import FAMILIES, VIDEO_FAMILIES, Sample, build_tiny_model, make_batch, make_singles
from torch import nn
from torch.nn.modules import module as nn_module

from vtw import withdraw
from vtw.flops import SampleCounts, count_flops
from vtw.grids import input_layouts
from vtw.methods import METHODS, Reduction
from vtw.methods.base import Merge
from vtw.withdraw import check_positions

NUM_LAYERS = 4
STEPS = 3
ATOL = 1e-4  # float32 logits: the reference runs the same layers on the same tokens; masks and op order differ
ATTN = ("eager", "sdpa")
GREEDY = dict(max_new_tokens=STEPS, do_sample=False)
CASES = [pytest.param(name, family, id=f"{name}-{family}") for name in METHODS for family in FAMILIES]


@functools.cache
def _model(family: str, attn: str = "sdpa"):
    """The tiny model of ``family`` (same weights for both attention implementations), shared by every test here."""
    model = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS)
    model.generation_config.eos_token_id = None  # always STEPS new tokens
    return model


@functools.cache
def _prompt(family: str, video: bool) -> dict:
    """One sample: an image (non-square: anyres unpadding, partial pooling windows), a video where allowed."""
    shape = (40, 24) if family.startswith("qwen") else (24, 40)
    sample = Sample(images=1, videos=int(video), prefix=3, suffix=5, image_shape=shape, frames=4)
    return make_singles(_model(family), [sample])[0]


def _batch_samples(video: bool) -> list[Sample]:
    """Different image counts and sizes, a text-only row, and a video (with an image) where the method takes one."""
    samples = [Sample(images=1, prefix=3, suffix=6), Sample(prefix=9, suffix=4),
               Sample(images=2, prefix=2, suffix=3, image_shape=(32, 64))]  # fmt: skip
    return samples + [Sample(images=1, videos=1, prefix=1, suffix=2, frames=4)] if video else samples


@dataclass(frozen=True)
class Case:
    """One (method, family) pair: ``refusal`` (the method's one line, when it cannot act on the family), whether
    the prompts carry a video, the reducing setting and the no-op settings (none: the method has none)."""

    refusal: str | None = None
    video: bool = False
    reducing: Reduction | None = None
    noops: tuple[Reduction, ...] = ()


def _declared(method: Reduction, model, counts: tuple[int, int], layout):
    """``layer_tokens`` of ``method`` for the prompt, ``None`` where it installs nothing on ``model`` (no stage
    before ``L``, or ``acts_on`` false), ``"invalid"`` where it does not resolve for ``L``."""
    try:
        resolved = method.resolve(NUM_LAYERS)
        if not [k for k in resolved.stages() if k < NUM_LAYERS] or not resolved.acts_on(model):
            return None
        return method.layer_tokens(NUM_LAYERS, *counts, layout)
    except ValueError:
        return "invalid"


@functools.cache
def _case(name: str, family: str) -> Case:
    """The settings of method ``name`` on ``family``, derived from the registry (module docstring)."""
    model = _model(family)
    default = METHODS[name]()
    try:
        default.check_supported(model.config)
    except ValueError as err:
        return Case(refusal=str(err))
    video = family in VIDEO_FAMILIES and _takes_video(default, model.config)
    inputs = _prompt(family, video)
    counts = _token_counts(model, inputs["input_ids"])
    (layout,) = input_layouts(model.config, inputs["input_ids"], inputs)
    full = sum(counts) * NUM_LAYERS
    candidates = list(dict.fromkeys([default, *default.budget_candidates(NUM_LAYERS)]))
    declared = [(m, _declared(m, model, counts, layout)) for m in candidates]
    reducing = {}  # total tokens over the layers -> the first candidate with it
    for method, tokens in declared:
        if tokens not in (None, "invalid") and any(v for v, _ in tokens) and sum(map(sum, tokens)) < full:
            reducing.setdefault(sum(map(sum, tokens)), method)
    if default in reducing.values():
        pick = default
    else:
        totals = sorted(reducing)
        pick = reducing[totals[len(totals) // 2]] if totals else None
    noops = [m for m, tokens in declared[1:] if tokens is None]  # the budget's settings that install nothing
    noops = ([default] if declared[0][1] is None else []) + noops[:1] + noops[-1:]
    return Case(video=video, reducing=pick, noops=tuple(dict.fromkeys(noops)))


def _takes_video(method: Reduction, config) -> bool:
    """Whether ``method`` acts on the videos of a model of ``config`` (else the prompts carry images only)."""
    try:
        method.check_supported(config, video=True)
    except ValueError:
        return False
    return True


def _supported(name: str, family: str) -> Case:
    """The pair's case; skips a refused pair with the method's reason."""
    case = _case(name, family)
    if case.refusal is not None:
        pytest.skip(f"refused: {case.refusal}")
    assert case.reducing is not None, f"{name}: no registry setting reduces the prompt on {family}"
    return case


def _spy(handle, untouched: torch.Tensor | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """``{stage: returned}``, filled during the prefill with what the method's ``select`` returned beyond a keep mask
    (one sample): ``merged`` ``(k,)`` the input columns of the kept tokens it gave new values and ``values`` ``(k,
    D)`` those values (a :class:`~vtw.methods.base.Merge` with ``hidden``); ``after`` ``(E,)`` the input column each
    token it added follows and ``added`` ``(E, D)`` their values (``Merge.extra``). The reference takes these values
    from the stage records; :func:`_check_records` holds the records to them. Nothing is recomputed. A method acting
    in the vision encoder gives stage 0 new values already (the projector ran on merged features): those that differ
    from ``untouched`` ``(1, T, D)``, the untouched model's decoder inputs, count as merged."""
    method, returned = handle.method, {}
    select = type(method).select

    def spy(ctx):
        out = select(method, ctx)
        if isinstance(out, Merge):
            seen = returned.setdefault(ctx.stage, {})
            hidden, before = out.hidden, ctx.hidden
            if hidden is None and untouched is not None and ctx.stage == 0:
                hidden, before = ctx.hidden, untouched.to(ctx.hidden)
            if hidden is not None:
                values = hidden.to(ctx.hidden)
                changed = (values != before).any(-1) & out.keep.bool().to(ctx.hidden.device)
                seen.update(merged=ctx.positions[changed], values=values[changed])
            if out.extra is not None:
                valid = out.extra.valid.bool().to(ctx.hidden.device)
                after = ctx.positions.gather(1, out.extra.after.to(ctx.hidden.device).clamp(min=0))
                seen.update(after=after[valid], added=out.extra.hidden.to(ctx.hidden)[valid])
        return out

    object.__setattr__(method, "select", spy)  # on this run's own method object only (a fresh copy)
    return returned


@dataclass(frozen=True)
class Run:
    """A reducing ``generate`` of one prompt: new tokens, their logits ``(STEPS, V)``, the stage records (values
    recorded), what the method returned per stage (:func:`_spy`), the realized ``(L, 2)`` layer tokens, and the
    cache lengths after it."""

    tokens: list[int]
    logits: torch.Tensor
    stages: tuple
    returned: dict
    layer_tokens: torch.Tensor
    cache_lengths: list[int]

    @property
    def merged(self) -> dict[int, torch.Tensor]:
        """``{stage: input columns whose values the method replaced}``, what :func:`stage_choices` takes."""
        return {s: r["merged"] for s, r in self.returned.items() if "merged" in r}


@functools.cache
def _run(name: str, family: str, attn: str, positions: str = "keep") -> Run:
    case = _supported(name, family)
    model, inputs = _model(family, attn), _prompt(family, case.video)
    untouched = decoder_inputs(model, inputs)[0] if case.reducing.acts_in == "vision_encoder" else None
    with torch.no_grad(), withdraw(model, method=replace(case.reducing), positions=positions) as handle:
        handle.record_hidden = True
        returned = _spy(handle, untouched)
        out = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    cache = out.past_key_values
    return Run(
        tokens=out.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
        logits=torch.stack(out.logits, dim=1)[0],
        stages=handle.last_stages,
        returned=returned,
        layer_tokens=handle.last_layer_tokens[0].clone(),
        cache_lengths=[cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)],
    )


def _check_records(run: Run) -> None:
    """The values the stage records carry are those the method returned: each merged token's new value at its
    column, each added token's value after the column it follows (marked ``extra``)."""
    for s, returned in run.returned.items():
        rec = run.stages[s]
        real = rec.keep_index[0] >= 0
        columns, extra, values = rec.keep_index[0][real], rec.extra[0][real], rec.hidden[0][real]
        for column, value in zip(returned.get("merged", []), returned.get("values", [])):
            at = torch.nonzero((columns == column) & ~extra).flatten()
            assert at.numel() == 1 and torch.equal(values[at[0]], value), f"stage {s}: merged column {int(column)}"
        for column, value in zip(returned.get("after", []), returned.get("added", [])):
            at = torch.nonzero((columns == column) & extra).flatten()
            assert any(torch.equal(values[j], value) for j in at), f"stage {s}: token added after {int(column)}"


# ------------------------------------------------------------------------------------------------ 1. exactness
@pytest.mark.parametrize(
    ("attn", "positions"), [("eager", "keep"), ("sdpa", "keep"), pytest.param("sdpa", "compact", id="sdpa-compact")]
)
@pytest.mark.parametrize(("name", "family"), CASES)
def test_cached_generate_equals_the_naive_reference(name, family, attn, positions):
    """Kept tokens keep their positions (``positions="keep"``, eager and SDPA), or are renumbered from each stage on
    (``"compact"``, 1-D RoPE families)."""
    case = _supported(name, family)
    try:
        check_positions(positions, _model(family).config)
    except ValueError as err:
        pytest.skip(f"refused: {err}")
    run = _run(name, family, attn, positions)
    inputs = _prompt(family, case.video)
    n = inputs["input_ids"].shape[1]
    assert int(run.layer_tokens.sum(-1).min()) < n, "the setting reduced nothing"
    assert int(run.layer_tokens[:, 0].max()) > 0, "no layer saw a vision token"
    _check_records(run)
    choices = stage_choices(run.stages, run.merged)
    tokens, logits = naive_generate(_model(family, attn), inputs, choices, STEPS, compact=positions == "compact")
    assert run.tokens == tokens
    torch.testing.assert_close(run.logits, logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ 2. batching
def _generate(model, inputs: dict, method: Reduction):
    """``(new tokens (B, STEPS), logits (B, STEPS, V), realized layer tokens (B, L, 2))`` under ``method``."""
    with torch.no_grad(), withdraw(model, method=replace(method)) as handle:
        out = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    return out.sequences[:, n:], torch.stack(out.logits, dim=1), handle.last_layer_tokens


def _reduced(layer_tokens: torch.Tensor, batch: dict) -> bool:
    """Whether some sample's realized ``(B, L, 2)`` layer tokens fall below its input length at some layer (a
    method acting on videos only reduces the video sample alone)."""
    return bool((layer_tokens.sum(-1).amin(-1) < batch["attention_mask"].sum(-1)).any())


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(("name", "family"), CASES)
def test_left_padded_batch_equals_each_sample_alone(name, family, attn):
    case = _supported(name, family)
    model = _model(family, attn)
    samples = _batch_samples(case.video)
    batch = make_batch(model, samples)
    vision = [_token_counts(model, row[None])[0] for row in batch["input_ids"]]
    assert vision[1] == 0 and 0 < vision[0] < vision[2] and (batch["attention_mask"] == 0).any()
    tokens, logits, realized = _generate(model, batch, case.reducing)
    assert _reduced(realized, batch), "the setting reduced nothing"
    for i, single in enumerate(make_singles(model, samples)):
        t, lg, alone = _generate(model, single, case.reducing)
        assert tokens[i].tolist() == t[0].tolist(), f"sample {i}"
        torch.testing.assert_close(logits[i], lg[0], atol=ATOL, rtol=0, msg=f"sample {i}")
        assert torch.equal(realized[i], alone[0]), f"sample {i}"


# ------------------------------------------------------------------------------------------------ 3. no-op, undo
HOOKS = tuple(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))
GLOBAL_HOOKS = tuple(k for k in dir(nn_module) if k.startswith("_global_") and isinstance(getattr(nn_module, k), dict))


def _installed(model) -> dict:
    """Every hook of every module (and torch's global module hooks) and every instance attribute of every module (its
    name, and the object where it is a function): what a handle may install and ``remove()`` must take away. (Other
    values are the model's own state: Qwen keeps its last ``rope_deltas``.)"""
    out = {name: ({k: tuple(getattr(m, k)) for k in HOOKS}, {k: id(v) if callable(v) else None for k, v in vars(m).items()})
           for name, m in model.named_modules()}  # fmt: skip
    out[""] = (out[""], {k: tuple(getattr(nn_module, k)) for k in GLOBAL_HOOKS})
    return out


def _baseline(model, batch):
    """The untouched model's ``(logits, greedy sequences)`` on ``batch``."""
    with torch.no_grad():
        return model(**batch).logits, model.generate(**batch, **GREEDY)


@pytest.mark.parametrize(("name", "family"), CASES)
def test_no_op_settings_install_nothing_and_are_bit_identical(name, family):
    case = _supported(name, family)
    if not case.noops:
        pytest.skip(f"{name} has no setting that installs nothing")
    model = _model(family)
    batch = make_batch(model, _batch_samples(case.video))
    logits, sequences = _baseline(model, batch)
    before = _installed(model)  # after a forward: transformers adds its own output-capturing hooks at the first
    for setting in case.noops:
        with torch.no_grad(), withdraw(model, method=replace(setting)) as handle:
            assert not handle.active, setting
            assert _installed(model) == before, setting
            assert torch.equal(model(**batch).logits, logits), setting
            assert torch.equal(model.generate(**batch, **GREEDY), sequences), setting


@pytest.mark.parametrize(("name", "family"), CASES)
def test_remove_restores_the_model_bit_identically(name, family):
    case = _supported(name, family)
    model = _model(family)
    batch = make_batch(model, _batch_samples(case.video))
    logits, sequences = _baseline(model, batch)
    before = _installed(model)
    handle = withdraw(model, method=replace(case.reducing))
    try:
        assert handle.active and _installed(model) != before
        with torch.no_grad():
            model(**batch)
            assert _reduced(handle.last_layer_tokens, batch), "the setting reduced nothing"
            model.generate(**batch, **GREEDY)
    finally:
        handle.remove()
    assert _installed(model) == before
    after_logits, after_sequences = _baseline(model, batch)
    assert torch.equal(after_logits, logits) and torch.equal(after_sequences, sequences)


# ------------------------------------------------------------------------------------------------ 4. FLOPs
@pytest.mark.parametrize(("name", "family"), CASES)
def test_flops_equal_flop_counter_mode_on_the_realized_counts(name, family):
    case = _supported(name, family)
    model, inputs = _model(family), _prompt(family, case.video)
    one = _measure(model, inputs, 1, None, replace(case.reducing))
    many = _measure(model, inputs, STEPS, None, replace(case.reducing))
    vision, text = _token_counts(model, inputs["input_ids"])
    (layout,) = input_layouts(model.config, inputs["input_ids"], inputs)
    report = count_flops(
        model.config,
        SampleCounts.of(_workload(model, inputs), vision, text, STEPS, vision_layout=layout),
        case.reducing,
        layer_tokens=_run(name, family, "sdpa").layer_tokens.tolist(),
    )
    assert _phase_with_reduction(report.prefill, case.reducing) == one
    assert _phase(report.decode) == {k: many[k] - one[k] for k in one}


# ------------------------------------------------------------------------------------------------ 5. KV caches
def _recorded_counts(stages, vision: torch.Tensor) -> list[list[int]]:
    """``[[vision, text]] * L`` each layer sees by the stage records (one sample; ``vision``: the input's ``(T,)``
    placeholder mask): the input's counts before the first stage, then the last stage's real tokens."""
    counts, current = [], [int(vision.sum()), int((~vision).sum())]
    for layer in range(NUM_LAYERS):
        for rec in stages:
            if rec.layer == layer:
                real = rec.keep_index[0] >= 0
                kept_vision = int((rec.vision[0] & real).sum())
                current = [kept_vision, int(real.sum()) - kept_vision]
        counts.append(current)
    return counts


@pytest.mark.parametrize(("name", "family"), CASES)
def test_deep_caches_hold_the_realized_tokens(name, family):
    case = _supported(name, family)
    model, inputs = _model(family), _prompt(family, case.video)
    cfg = model.config
    ids = [cfg.image_token_id] + ([cfg.video_token_id] if getattr(cfg, "video_token_id", None) is not None else [])
    vision = torch.isin(inputs["input_ids"][0], torch.tensor(ids))
    with torch.no_grad(), withdraw(model, method=replace(case.reducing)) as handle:
        cache = model(**inputs, use_cache=True).past_key_values
    lengths = [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)]
    realized = handle.last_layer_tokens[0]
    assert lengths == realized.sum(-1).tolist()
    assert realized.tolist() == _recorded_counts(handle.last_stages, vision)
    for rec in handle.last_stages:  # the records' vision flags are the input's (added tokens count as vision)
        real = rec.keep_index[0] >= 0
        own = real & ~rec.extra[0]
        assert torch.equal(rec.vision[0][own], vision[rec.keep_index[0][own]]) and bool(
            rec.vision[0][real & rec.extra[0]].all()
        )
    assert _run(name, family, "sdpa").cache_lengths == [n + STEPS - 1 for n in lengths]  # one per decode step
