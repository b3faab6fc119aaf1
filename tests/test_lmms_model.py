"""The lmms-eval model ``vtw``: registration, argument checks, batched loglikelihood and generation against naive
per-sample references (with and without withdrawal), and the per-request FLOPs records."""

from __future__ import annotations

import pytest
import torch
from test_lmms_fixtures import COLORS, VISION_TOKENS
from test_peer_methods import _naive_logits
from test_withdraw import _lm_inputs, _vision

from vtw.lmms.model import VTWModel, _cut_at_stop, _generated_length, parse_layer


@pytest.fixture(scope="module")
def task_objs(tiny_tasks):
    from lmms_eval.tasks import TaskManager, get_task_dict

    root, names = tiny_tasks
    tm = TaskManager(include_path=str(root), include_defaults=False)
    tasks = get_task_dict([names["gen"], names["mc"]], tm)
    for t in tasks.values():
        t.build_all_requests(limit=None, rank=0, world_size=1)
    return names, tasks


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def model_dir(request):
    """The saved tiny model of each family the wrapper is tested on (fixed-resolution LLaVA; Qwen2-VL, whose
    images of different sizes give different numbers of vision tokens)."""
    return request.getfixturevalue("tiny_llava_dir" if request.param == "llava" else "tiny_qwen_dir")


@pytest.fixture(scope="module")
def ref_model(model_dir):
    """A separate plain copy of the model for the references (the wrapper's copy carries its own hooks)."""
    import transformers
    from transformers import AutoConfig

    from vtw import get_family

    cls = getattr(transformers, get_family(AutoConfig.from_pretrained(model_dir)).model_class)
    return cls.from_pretrained(model_dir).eval()


def _vision_tokens(lm, image) -> tuple[int, dict]:
    """Vision tokens of one image and its encoder work as :class:`vtw.flops.SampleCounts` fields, from the image
    processor alone."""
    if lm.family.mrope:
        grid = lm.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        return int(grid.prod()) // 4, {"vision_grids": [tuple(grid.tolist())]}
    return VISION_TOKENS, {"vision_inputs": 1}


def _model(path, task_objs, **kw) -> VTWModel:
    names, tasks = task_objs
    lm = VTWModel(pretrained=str(path), device="cpu", progress=False, **kw)
    for name, t in tasks.items():
        lm.task_dict[name] = t.dataset
    return lm


# ---------------------------------------------------------------------------------------------- registration
def test_entry_point_registers_vtw():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vtw"]
    assert eps, 'pyproject.toml must declare [project.entry-points."lmms_eval.models"] vtw = ...'
    assert get_model("vtw") is VTWModel


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"layer": 99}, "0..4"),
        ({"layer": "abc"}, "abc"),
        ({"layer": "auto"}, "run.py"),
        ({"method": "no_such_method"}, "no_such_method"),
        ({"method": "fastv", "layer": 2, "keep": 1.5}, "fastv keep must be a number in"),
        ({"method": "pdrop", "layers": "1;x;3"}, "layers='1;x;3' must be a ';'-separated list"),
        ({"method": "pdrop", "layers": "1;2;9"}, "out of range"),
        ({"method": "vtw", "layer": 2, "keep": 0.5}, "keep=0.5 is not a parameter of method vtw; it takes: layer"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "int8"}, "int8"),
        ({"attn_implementation": "flash_attention_2"}, "flash_attention_2"),
        ({"colour": 1}, "colour"),
        ({"chat_template": "no such template"}, "no such template"),
    ],
)
def test_bad_args_fail_before_weights_load(tiny_llava_dir, monkeypatch, kwargs, needle):
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", boom)
    with pytest.raises(ValueError, match=needle):
        VTWModel(pretrained=str(tiny_llava_dir), device="cpu", **kwargs)


def test_missing_model_dir_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read a model config"):
        VTWModel(pretrained=str(tmp_path / "nope"), device="cpu")


def test_parse_layer_and_text_helpers():
    assert parse_layer(None) is None and parse_layer("null") is None and parse_layer("None") is None
    assert parse_layer("12") == 12 and parse_layer(3) == 3 and parse_layer(4.0) == 4
    with pytest.raises(ValueError, match="layer must be an integer or None, got True"):
        parse_layer(True)
    assert _cut_at_stop("red. blue", ["."]) == "red"
    assert _cut_at_stop("a\nb ASSISTANT: c", ["ASSISTANT:", "\n"]) == "a"
    assert _cut_at_stop("red", []) == "red"
    eos, pad = [2], 0
    assert _generated_length([5, 6, 2, 0, 0], eos, pad) == 3  # EOS counts, padding after it does not
    assert _generated_length([5, 0, 0], eos, pad) == 1  # stopped by a stop string: padded afterwards
    assert _generated_length([5, 6, 7], eos, pad) == 3


# ---------------------------------------------------------------------------------------------- loglikelihood
def _reference_nll(model, processor, prompt: str, continuation: str, image, layer):
    """Mean NLL of the continuation tokens, one unpadded sample, positions found from the vision mask."""
    from vtw import withdraw

    tok = processor.tokenizer
    n = len(tok(prompt + continuation, add_special_tokens=False)["input_ids"]) - len(
        tok(prompt, add_special_tokens=False)["input_ids"]
    )
    batch = processor(text=[prompt + continuation], images=[image], return_tensors="pt")
    ids = batch["input_ids"][0]
    with torch.no_grad(), withdraw(model, layer=layer):
        logits = model(**batch).logits[0]  # (T_out, V)
    if layer is None:
        out_pos = torch.arange(len(ids))
    else:  # output positions are the text positions, in order (batch of one, no padding)
        out_pos = torch.nonzero(ids != model.config.image_token_id).flatten()  # the config's own placeholder id
    index = {int(p): i for i, p in enumerate(out_pos)}
    T = len(ids)
    rows = torch.stack([logits[index[t - 1]] for t in range(T - n, T)])
    logp = torch.log_softmax(rows.float(), -1)
    target = ids[T - n :]
    return -float(logp.gather(-1, target[:, None]).mean()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("layer", [None, 2, 0])
def test_loglikelihood_batched_matches_per_sample_reference(model_dir, task_objs, ref_model, layer):
    names, tasks = task_objs
    task = tasks[names["mc"]]
    reqs = task.instances
    lm = _model(model_dir, task_objs, batch_size=5, layer=layer)
    out = lm.loglikelihood(reqs)
    assert len(out) == len(reqs) == 6 * len(COLORS)
    for req, res in list(zip(reqs, out))[:: len(COLORS) - 1]:  # a spread of requests (every 3rd)
        context, cont, doc_to_visual, doc_id, _, split = req.args
        doc = lm.task_dict[names["mc"]][split][doc_id]
        prompt = lm.inputs.prompt(context, 1, 0)
        image = doc_to_visual(doc)[0]
        nll, greedy = _reference_nll(ref_model, lm.processor, prompt, cont, image, layer)
        assert res.text[0] == pytest.approx(nll, rel=1e-4, abs=1e-5)
        assert res.text[1] == greedy
    records = lm.pop_records()
    assert len(records) == len(reqs) and all(r.request_type == "loglikelihood" for r in records)
    for r in records:
        doc = lm.task_dict[names["mc"]]["test"][r.doc_id]
        assert r.vision_tokens == _vision_tokens(lm, doc["image"].convert("RGB"))[0]


@pytest.fixture(scope="module")
def eager_ref_model(model_dir):
    """A plain copy with eager attention: the naive reference reads the layers' own attention weights."""
    import transformers
    from transformers import AutoConfig

    from vtw import get_family

    cls = getattr(transformers, get_family(AutoConfig.from_pretrained(model_dir)).model_class)
    return cls.from_pretrained(model_dir, attn_implementation="eager").eval()


def _naive_context_nll(model, lm, prompt: str, continuation: str, image) -> float:
    """Mean NLL of the continuation under ``lm.method``, by the naive reference of ``test_peer_methods`` (layers by
    hand, no cache): the context alone (the first ``T - n`` tokens of context + continuation) picks the kept tokens,
    then those plus every continuation token run."""
    tok = lm.processor.tokenizer
    n = len(tok(prompt + continuation, add_special_tokens=False)["input_ids"]) - len(
        tok(prompt, add_special_tokens=False)["input_ids"]
    )
    full = lm.processor(text=[prompt + continuation], images=[image], return_tensors="pt")
    length = full["input_ids"].shape[1]
    alone = {k: v[:, : length - n] if v.dim() >= 2 and v.shape[:2] == (1, length) else v for k, v in full.items()}
    with torch.no_grad():
        _, chosen = _naive_logits(model, *_lm_inputs(model, alone), _vision(model, alone["input_ids"]), lm.method,
                                  length - n)  # fmt: skip
        logits, _ = _naive_logits(model, *_lm_inputs(model, full), _vision(model, full["input_ids"]), lm.method,
                                  length - n, chosen)  # fmt: skip
    logp = torch.log_softmax(logits[-n - 1 : -1].float(), -1)
    return -float(logp.gather(-1, full["input_ids"][0, length - n :, None]).mean())


@pytest.mark.parametrize(
    ("method", "params"), [("fastv", {"layer": 3, "keep": 0.5}), ("pdrop", {"layers": "1;2;3", "keep": "0.5;0.3;0.1"})]
)
def test_loglikelihood_reduction_decides_from_the_context_alone(model_dir, task_objs, eager_ref_model, method, params):
    """Every option of a question is scored on the tokens the context alone keeps (FastV and PyramidDrop rank by
    the last *context* token, not by each option's last token), batched with left padding, == the naive
    reference."""
    names, tasks = task_objs
    reqs = tasks[names["mc"]].instances[: 2 * len(COLORS)]  # two questions, every option
    lm = _model(model_dir, task_objs, batch_size=3, method=method, **params)  # batches mix questions: padding
    out = lm.loglikelihood(reqs)
    for req, res in zip(reqs, out):
        context, cont, doc_to_visual, doc_id, _, split = req.args
        image = doc_to_visual(lm.task_dict[names["mc"]][split][doc_id])[0]
        nll = _naive_context_nll(eager_ref_model, lm, lm.inputs.prompt(context, 1, 0), cont, image)
        assert res.text[0] == pytest.approx(nll, rel=1e-4, abs=1e-5), (doc_id, cont)


def test_loglikelihood_random_method_never_drops_the_continuation(model_dir, task_objs):
    """``random`` drops any token, but in a loglikelihood request it draws over the context only: every option is
    scored (the continuation's log-probs exist) on the context tokens the context alone keeps; batched == one by
    one."""
    names, tasks = task_objs
    reqs = tasks[names["mc"]].instances
    batched = [r.text for r in _model(model_dir, task_objs, batch_size=4, layer=1, method="random").loglikelihood(reqs)]
    lm = _model(model_dir, task_objs, batch_size=1, layer=1, method="random")
    single = [r.text for r in lm.loglikelihood(reqs)]
    assert all(0 < nll < float("inf") for nll, _ in batched)
    assert [nll for nll, _ in batched] == pytest.approx([nll for nll, _ in single], rel=1e-4, abs=1e-5)
    context, _, doc_to_visual, doc_id, _, split = reqs[0].args
    alone = lm.inputs.sample(context, doc_to_visual, lm.task_dict[names["mc"]][split][doc_id])
    with torch.no_grad():
        lm.model(**alone)
    n_context = alone["input_ids"].shape[1]
    kept_alone = lm.handle.last_keep_index[0]
    assert kept_alone.numel() < n_context  # tokens were dropped
    for req in reqs[: len(COLORS)]:  # every option of that question, one by one
        lm.loglikelihood([req])
        kept = lm.handle.last_keep_index[0]
        assert torch.equal(kept[kept < n_context], kept_alone), req.args[1]
        assert kept[kept >= n_context].numel() >= 1  # its continuation tokens, all of them (else the call raised)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("layer", [None, 2])
def test_generation_batched_equals_one_by_one_and_plain_hf(model_dir, task_objs, ref_model, layer):
    from vtw import withdraw

    names, tasks = task_objs
    reqs = tasks[names["gen"]].instances
    batched = [r.text for r in _model(model_dir, task_objs, batch_size=4, layer=layer).generate_until(reqs)]
    lm1 = _model(model_dir, task_objs, batch_size=1, layer=layer)
    single = [r.text for r in lm1.generate_until(reqs)]
    assert batched == single
    # plain transformers generate on one unpadded sample, the same prompt, greedy, cut at the stop string
    context, gen_kwargs, doc_to_visual, doc_id, _, split = reqs[1].args
    doc = lm1.task_dict[names["gen"]][split][doc_id]
    batch = lm1.processor(text=[lm1.inputs.prompt(context, 1, 0)], images=doc_to_visual(doc), return_tensors="pt")
    with torch.no_grad(), withdraw(ref_model, layer=layer):
        ids = ref_model.generate(**batch, max_new_tokens=gen_kwargs["max_new_tokens"], do_sample=False)
    text = lm1.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert single[1] == text.split(".")[0]


@pytest.mark.parametrize(
    ("method", "params"),
    [("vtw", {"layer": 2}), ("fastv", {"layer": 2, "keep": 0.5}), ("pdrop", {"layers": "1;2;3"})],
)
def test_generation_records_flops_per_request(model_dir, task_objs, method, params):
    from vtw.flops import SampleCounts, count_flops, paper_flops

    names, tasks = task_objs
    reqs = tasks[names["gen"]].instances
    lm = _model(model_dir, task_objs, batch_size=3, method=method, **params)
    reduction = lm.method
    lm.generate_until(reqs)
    records = lm.pop_records()
    assert sorted(r.doc_id for r in records) == list(range(6))
    tok = lm.tokenizer
    for r, req in zip(sorted(records, key=lambda r: r.doc_id), reqs):
        prompt = lm.inputs.prompt(req.args[0], 1, 0)
        doc = lm.task_dict[names["gen"]]["test"][r.doc_id]
        n_vision, encoder = _vision_tokens(lm, doc["image"].convert("RGB"))
        # the prompt's tokens but the one image placeholder (<image>, or Qwen's <|image_pad|>; its start/end are text)
        n_text = len(tok(prompt, add_special_tokens=False)["input_ids"]) - 1
        assert (r.vision_tokens, r.text_tokens) == (n_vision, n_text)
        assert 1 <= r.generated_tokens <= 4
        sample = SampleCounts(n_vision, n_text, r.generated_tokens, **encoder)
        assert r.flops == count_flops(lm.config, sample, reduction).total
        assert r.flops_full == count_flops(lm.config, sample).total
        assert r.paper_flops == paper_flops(lm.config, SampleCounts(n_vision, n_text), reduction)
        assert r.layer == (1 if method == "pdrop" else 2)
        assert r.flops < r.flops_full and r.latency_s > 0 and r.batch_size == 3


def test_records_count_what_each_layer_really_processed(model_dir, task_objs, ref_model):
    """A method whose kept counts depend on the data (SparseVLM: the attention matrix's rank): each record's FLOPs
    follow the tokens each layer really processed, measured here independently as the KV-cache length of every layer
    after the sample's prefill alone (text is never dropped, so the rest is vision); ``flops_expected`` follows the
    method's declared counts."""
    from vtw import withdraw
    from vtw.flops import SampleCounts, count_flops

    names, tasks = task_objs
    reqs = tasks[names["gen"]].instances[:3]
    lm = _model(model_dir, task_objs, batch_size=3, method="sparsevlm", layers="0;1", keep="0.5;0.5")
    lm.generate_until(reqs)
    records = sorted(lm.pop_records(), key=lambda r: r.doc_id)
    assert len(records) == 3
    differs = 0
    for r, req in zip(records, reqs):
        doc = lm.task_dict[names["gen"]]["test"][r.doc_id]
        n_vision, encoder = _vision_tokens(lm, doc["image"].convert("RGB"))
        inputs = lm.inputs.encode([lm.inputs.prompt(req.args[0], 1, 0)], [doc["image"].convert("RGB")], [])
        with withdraw(ref_model, method=lm.method), torch.no_grad():
            cache = ref_model(**inputs, use_cache=True).past_key_values
        lengths = [cache.layers[i].keys.shape[-2] for i in range(lm.num_layers)]
        realized = [(n - r.text_tokens, r.text_tokens) for n in lengths]
        sample = SampleCounts(n_vision, r.text_tokens, r.generated_tokens, **encoder)
        assert r.flops == count_flops(lm.config, sample, lm.method, layer_tokens=realized).total
        assert r.flops_expected == count_flops(lm.config, sample, lm.method).total
        differs += r.flops != r.flops_expected
    assert differs  # the rank-based counts exceed the declared lower bound on these images


@pytest.mark.parametrize("kind", ["gen", "mc"])
def test_first_timed_call_is_preceded_by_one_untimed_warm_up(model_dir, task_objs, kind):
    """Latency is not charged with one-off start-up costs: the wrapper's first batch runs one extra, untimed forward
    (seen as one more call of the model than the same batch needs afterwards); later batches and calls run none, and
    switching the layer does not warm up again."""
    names, tasks = task_objs
    reqs = tasks[names[kind]].instances[:3]
    lm = _model(model_dir, task_objs, batch_size=3, layer=2)
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    run = lm.generate_until if kind == "gen" else lm.loglikelihood
    try:
        first = [r.text for r in run(reqs)]
        n_first = len(calls)
        lm.set_layer(None)
        lm.set_layer(2)
        second = [r.text for r in run(reqs)]
        n_second = len(calls) - n_first
    finally:
        hook.remove()
    assert first == second and lm.warmed_up
    assert n_first == n_second + 1


def test_peer_methods_from_model_args(tiny_llava_dir):
    """The lmms-eval model args pick the method; lists use ';' (lmms-eval's `key=value,...` parser splits on ',')."""
    from lmms_eval.utils import simple_parse_args_string

    import vtw
    from vtw.methods import FastV, PyramidDrop

    args = simple_parse_args_string(
        f"pretrained={tiny_llava_dir},device=cpu,method=pdrop,layers=1;2;3,keep=0.5;0.25;0.125"
    )
    lm = VTWModel(**args)
    assert lm.method == PyramidDrop(layers=(1, 2, 3), keep=(0.5, 0.25, 0.125)) and lm.handle.stages == (1, 2, 3)
    lm = VTWModel(**simple_parse_args_string(f"pretrained={tiny_llava_dir},device=cpu,method=fastv,layer=2,keep=0.5"))
    assert lm.method == FastV(layer=2, keep=0.5) and lm.layer == 2
    lm.set_layer(3)  # the method in force, at another layer
    assert lm.method == FastV(layer=3, keep=0.5)
    lm.set_layer(None)  # the full model
    assert not lm.handle.active and lm.method == vtw.Withdrawal()
