"""The shipped tiny LLaVA (vtw/assets/tiny-llava): loads offline, answers test items, runs in lmms-eval's llava_hf;
and the training script (a smoke run on a toy size)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw.synthvqa.generator import Scene, iter_items, make_item
from vtw.synthvqa.model import (
    CHAT_TEMPLATE,
    NUM_IMAGE_TOKENS,
    TinyLlavaSpec,
    build_tokenizer,
    conversation_text,
    grid_position_table,
)
from vtw_train import synthvqa as train_module
from vtw_train.core import head_attention, save_checkpoint
from vtw_train.synthvqa import TrainConfig, make_batch, masked_forward, train

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "vtw" / "assets" / "tiny-llava"
TASKS = ROOT / "vtw" / "assets" / "tasks"
FIXED_ITEMS = tuple(range(10))  # the first ten test items (every question kind occurs among them)
TOY_SPEC = TinyLlavaSpec(
    vision_width=32, vision_layers=1, vision_heads=2, vision_ffn=64, text_width=32, text_heads=2, text_kv_heads=2,
    text_ffn=64,
)  # fmt: skip
"""Sizes for training-code tests: the shipped architecture's layout at a width that trains in seconds."""


@pytest.fixture(scope="module")
def shipped():
    model = LlavaForConditionalGeneration.from_pretrained(ASSET, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    return model, processor


def _generate(model, processor, items) -> list[str]:
    """Greedy answers through the plain HF path: chat template, processor, left padding, generate."""
    texts = [
        conversation_text(processor.tokenizer, [(it.prompt, it.answer)], add_generation_prompt=True) for it in items
    ]
    inputs = processor(images=[it.image() for it in items], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def test_checkpoint_is_small_float32_safetensors():
    files = list(ASSET.iterdir())
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert weights and not [f for f in files if f.suffix in (".bin", ".pt", ".pth")]
    for path in weights:
        with safe_open(str(path), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}


def test_architecture_and_vision_token_count(shipped):
    model, processor = shipped
    config = model.config
    assert config.text_config.num_hidden_layers >= 8
    assert config.vision_config.model_type == "clip_vision_model" and config.projector_hidden_act == "gelu"
    item = make_item("test", 0)
    text = conversation_text(processor.tokenizer, [(item.prompt, item.answer)], add_generation_prompt=True)
    inputs = processor(images=[item.image()], text=[text], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
    assert image_tokens == NUM_IMAGE_TOKENS == features[0].shape[0] == 144
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    assert text_tokens < 30, "vision tokens must dominate the sequence"


def test_shipped_tokenizer_and_template_match_the_builder(shipped):
    _, processor = shipped
    assert processor.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE == processor.chat_template
    messages = [{"role": "user", "content": "<image>\nWhat color is the circle?"}]  # llava_hf's string form
    structured = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}
    ]
    as_string = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert as_string == processor.apply_chat_template(structured, add_generation_prompt=True)
    assert as_string == "USER: <image>\nWhat color is the circle? ASSISTANT:"


def test_shipped_model_answers_fixed_test_items(shipped):
    model, processor = shipped
    items = [make_item("test", i) for i in FIXED_ITEMS]
    assert len({it.kind for it in items}) == 5
    assert _generate(model, processor, items) == [it.answer for it in items]


def test_shipped_model_accuracy_on_the_first_100_test_items(shipped):
    model, processor = shipped
    items = list(iter_items("test", 100))
    answers = []
    for start in range(0, 100, 25):
        answers += _generate(model, processor, items[start : start + 25])
    accuracy = sum(a == it.answer for a, it in zip(answers, items)) / len(items)
    assert accuracy >= 0.9


def _single_batch(processor, item, pixel_values=None) -> train_module.Batch:
    """One prompt (no answer) as a training Batch; `pixel_values` replaces the item's own image if given."""
    text = conversation_text(processor.tokenizer, [(item.prompt, item.answer)], add_generation_prompt=True)
    inputs = processor(images=[item.image()], text=[text], return_tensors="pt")
    pixels = inputs["pixel_values"] if pixel_values is None else pixel_values
    return train_module.Batch(
        inputs["input_ids"], inputs["attention_mask"], torch.full_like(inputs["input_ids"], -100), pixels
    )


def test_masked_forward_agrees_with_vtw_withdraw(shipped):
    """The training-time withdrawal simulation (attention masks) equals vtw.withdraw (token removal) on the last
    prompt token, and at K=0 the text positions no longer depend on the image."""
    from vtw import withdraw

    model, processor = shipped
    num_layers = model.config.text_config.num_hidden_layers
    for index in range(3):
        batch = _single_batch(processor, make_item("test", index))
        inputs = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "pixel_values": batch.pixel_values,
        }
        for layer in (0, 2, 5, num_layers):
            with torch.no_grad():
                simulated = model.lm_head(masked_forward(model, batch, torch.tensor([layer]))[:, -1])
                with withdraw(model, layer=layer):
                    reference = model(**inputs).logits[:, -1]
            torch.testing.assert_close(simulated, reference, atol=2e-4, rtol=1e-4)
    item = make_item("test", 0)
    own, other = (
        _single_batch(processor, item),
        _single_batch(processor, item, make_batch(processor, [make_item("test", 50)]).pixel_values),
    )
    text = own.input_ids[0] != model.config.image_token_id
    with torch.no_grad():
        at_zero = [masked_forward(model, b, torch.tensor([0]))[0, text] for b in (own, other)]
        at_full = [masked_forward(model, b, torch.tensor([num_layers]))[0, text] for b in (own, other)]
    torch.testing.assert_close(at_zero[0], at_zero[1])
    assert not torch.allclose(at_full[0], at_full[1]), "without withdrawal the text must see the image"


def test_llava_hf_runs_the_tasks(shipped, monkeypatch):
    """lmms-eval's own llava_hf wrapper loads the checkpoint and scores the short-answer task offline; its exact-match
    score on the first items equals the one computed here with plain HF generate. (llava_hf is a chat model, which
    lmms-eval 0.7 only runs on generation tasks; the multiple-choice form is run by the vtw wrapper.)"""
    pytest.importorskip("decord", reason="lmms-eval's llava_hf imports decord (pip install decord)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    limit = 8
    results = simple_evaluate(
        model="llava_hf",
        model_args=f"pretrained={ASSET},device=cpu,device_map=cpu,dtype=float32",
        tasks=["vtw_synthvqa"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        limit=limit,
        batch_size=1,
        bootstrap_iters=0,
    )
    model, processor = shipped
    items = [make_item("test", i) for i in range(limit)]
    expected = sum(a == it.answer for a, it in zip(_generate(model, processor, items), items)) / limit
    assert results["results"]["vtw_synthvqa"]["exact_match,none"] == pytest.approx(expected)
    assert expected >= 0.75


def test_training_smoke_run_and_atomic_save(tmp_path):
    config = TrainConfig(
        steps=2,
        batch_size=2,
        vision_steps=2,
        vision_batch_size=2,
        warmup_steps=1,
        withdraw_prob=1.0,
        withdraw_min_layer=3,
        spec=TOY_SPEC,
    )
    model, processor, report = train(config, progress=False)
    assert report.seconds > 0 and torch.isfinite(torch.tensor(report.final_loss))
    target = tmp_path / "ckpt"
    save_checkpoint(model, processor, target)
    save_checkpoint(model, processor, target)  # replacing an existing checkpoint works too
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "temporary directories left behind"
    reloaded = LlavaForConditionalGeneration.from_pretrained(target).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    answer = _generate(reloaded, AutoProcessor.from_pretrained(target), [make_item("test", 0)])
    assert isinstance(answer[0], str)


def test_train_pixels_equal_the_image_processor():
    """Training normalises the rendered images itself (`pixel_values`); the numbers are the image processor's."""
    processor = train_module.build_processor()
    images = [make_item("train", i).image() for i in range(3)]
    ref = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ours = train_module.pixel_values(processor, images)
    assert ours.shape == ref.shape == (3, 3, 192, 192)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected RGB 192x192 images"):
        train_module.pixel_values(processor, [images[0].convert("L")])


def test_stage_two_keeps_the_vision_tower_frozen(monkeypatch):
    snapshots = {}
    original = train_module.pretrain_vision

    def record(model, processor, config, progress=True):
        result = original(model, processor, config, progress)
        snapshots["tower"] = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
        snapshots["projector"] = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
        return result

    monkeypatch.setattr(train_module, "pretrain_vision", record)
    config = TrainConfig(steps=3, batch_size=2, vision_steps=1, vision_batch_size=2, warmup_steps=1, spec=TOY_SPEC)
    model, _, _ = train_module.train(config, progress=False)
    for key, value in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(value, snapshots["tower"][key])
    changed = [
        not torch.equal(v, snapshots["projector"][k]) for k, v in model.model.multi_modal_projector.state_dict().items()
    ]
    assert any(changed), "the projector must keep training in stage 2"


def test_bad_training_arguments_are_rejected():
    with pytest.raises(ValueError, match="withdraw_prob must be in"):
        TrainConfig(withdraw_prob=1.5)
    with pytest.raises(ValueError, match="steps must be > 0"):
        train_module.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="text_layers must be >= 8"):
        TinyLlavaSpec(text_layers=4)
    with pytest.raises(ValueError, match=r"guide_layers must be \(find, relay\).*got \(2, 1\)"):
        TrainConfig(guide_layers=(2, 1))
    with pytest.raises(ValueError, match="guide_weight must be >= 0, got -1.0"):
        TrainConfig(guide_weight=-1.0)


def test_head_attention_equals_the_layers_own_eager_attention():
    """The guidance loss reads attention probabilities through `head_attention`; they must be exactly what the
    decoder layer's own (eager) attention computes for those queries and that head."""
    spec = dataclasses.replace(TOY_SPEC, text_width=64, text_heads=4)  # 4 query heads on 2 key/value heads (GQA)
    processor = train_module.build_processor()
    model = train_module.build_model(spec, processor.tokenizer, seed=3).eval()
    batch = make_batch(processor, [make_item("train", i) for i in range(4)], follow_ups=3)
    assert len(batch.find_queries) >= 4
    inputs: dict = {}
    with torch.no_grad():
        masked_forward(model, batch, torch.full((4,), spec.text_layers), inputs)
        layer = model.model.language_model.layers[1]
        additive = torch.zeros(inputs["mask"].shape).masked_fill(~inputs["mask"], float("-inf"))[:, None]
        model.config.text_config._attn_implementation = "eager"
        _, weights = layer.self_attn(
            layer.input_layernorm(inputs[1]), position_embeddings=inputs["rotary"], attention_mask=additive
        )  # (B, H, T, T)
        rows, positions = batch.find_queries[:, 0], batch.find_queries[:, 1]
        for head in range(spec.text_heads):
            ours = head_attention(layer, inputs[1], inputs["rotary"], inputs["mask"], batch.find_queries, head)
            torch.testing.assert_close(ours, weights[rows, head, positions], atol=1e-6, rtol=1e-5)


def _single_object_coverage(obj) -> torch.Tensor:
    """(144,) fraction of each 16 px patch covered by `obj`, from a rendering of `obj` alone (white on black)."""
    alone = Scene(objects=(obj,), background=(0, 0, 0))
    pixels = torch.from_numpy(np.asarray(alone.render()).copy()).float().sum(dim=-1) > 0  # (192, 192)
    return pixels.reshape(12, 16, 12, 16).permute(0, 2, 1, 3).reshape(144, 256).float().mean(dim=1)


def test_guidance_rows_point_at_the_named_object():
    """Each guidance row's query is the word naming the object; the object it targets fits that word and the answer
    (checked from the scene's geometry); its targets are the vision tokens of the patches that object covers by
    >= 15% (recomputed from a rendering of the object alone); the relay query is the `:` that predicts the answer."""
    processor = train_module.build_processor()
    tokenizer = processor.tokenizer
    items = [make_item("train", i) for i in range(16)]
    batch = make_batch(processor, items, follow_ups=4)
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    assert len(batch.find_queries) > len(items)
    seen = set()
    for n, ((row, word), (_, relay)) in enumerate(zip(batch.find_queries.tolist(), batch.relay_queries.tolist())):
        ids = batch.input_ids[row].tolist()
        objects = items[row].scene.objects
        named = tokenizer.convert_ids_to_tokens(ids[word])
        assert tokenizer.convert_ids_to_tokens(ids[relay - 1 : relay + 1]) == ["ASSISTANT", ":"] and word < relay
        assert int(batch.labels[row, relay + 1]) == ids[relay + 1]
        answer = tokenizer.convert_ids_to_tokens(ids[relay + 1])
        vision = [i for i, t in enumerate(ids) if t == image_id]
        targets = torch.nonzero(batch.find_targets[n]).flatten().tolist()
        assert bool(batch.find_spread[n]) == (named == "many")
        if named == "many":  # counting: every object's centre patch, and <s>
            assert answer == str(len(objects)) and ids[0] == tokenizer.bos_token_id
            assert targets == sorted([0] + [vision[(o.cy // 16) * 12 + o.cx // 16] for o in objects])
            seen.add(named)
            continue
        fitting = []
        for obj in objects:
            coverage = _single_object_coverage(obj)
            if targets == [vision[p] for p in torch.nonzero(coverage >= 0.15).flatten().tolist()]:
                fitting.append(obj)
        assert len(fitting) == 1, (named, answer, objects)
        obj = fitting[0]
        other = [o for o in objects if o is not obj]
        if named in ("circle", "square", "triangle", "cross"):
            assert obj.shape == named and obj.color == answer
        elif named in ("left", "right", "top", "bottom"):
            coordinate = (lambda o: o.cx) if named in ("left", "right") else (lambda o: o.cy)
            sign = -1 if named in ("left", "top") else 1
            assert sign * coordinate(obj) > sign * coordinate(other[0]) and obj.color == answer
        elif named in ("larger", "smaller"):
            sign = 1 if named == "larger" else -1
            assert sign * obj.size > sign * other[0].size and obj.color == answer
        else:
            assert obj.color == named and obj.shape == answer
        seen.add(named)
    assert len(seen) >= 7 and "many" in seen


def test_vtw_wrapper_scores_the_multiple_choice_task(monkeypatch):
    """The multiple-choice form, through the vtw lmms-eval model (likelihood of each candidate): the shipped model
    is far above chance (1/4) at the baseline and with withdrawal on the plateau of the curve."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    for layer in ("null", "3"):
        results = simple_evaluate(
            model="vtw",
            model_args=f"pretrained={ASSET},layer={layer},device=cpu",
            tasks=["vtw_synthvqa_mc"],
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            limit=24,
            batch_size=8,
            bootstrap_iters=0,
        )
        assert results["results"]["vtw_synthvqa_mc"]["acc,none"] >= 0.8, layer


def test_grid_position_table_encodes_column_and_row():
    """Hand-derived values: CLS row zero; the first half of a patch's vector depends on its column only, the second
    half on its row only; the shortest period is 2 patches (sin 0, cos +-1) and the longest 4 x grid."""
    import math

    table = grid_position_table(width=16, grid=12, amplitude=0.5)  # quarter = 4 periods: 2, 2*24**(1/3), ..., 48
    assert table.shape == (145, 16) and not table[0].any()
    patch = lambda r, c: table[1 + r * 12 + c]  # noqa: E731
    for r, c in ((0, 0), (3, 7), (11, 5)):
        torch.testing.assert_close(patch(r, c)[:8], patch((r + 5) % 12, c)[:8])  # same column
        torch.testing.assert_close(patch(r, c)[8:], patch(r, (c + 4) % 12)[8:])  # same row
        assert patch(r, c)[0] == pytest.approx(0.0, abs=1e-6) and patch(r, c)[4] == pytest.approx(0.5 * (-1) ** c)
        assert patch(r, c)[8] == pytest.approx(0.0, abs=1e-6) and patch(r, c)[12] == pytest.approx(0.5 * (-1) ** r)
        assert patch(r, c)[3] == pytest.approx(0.5 * math.sin(2 * math.pi * c / 48), abs=1e-6)
        assert patch(r, c)[15] == pytest.approx(0.5 * math.cos(2 * math.pi * r / 48), abs=1e-6)
    assert not torch.allclose(patch(0, 1)[:8], patch(0, 2)[:8])
    with pytest.raises(ValueError, match="multiple of 4, got 30"):
        TinyLlavaSpec(vision_width=30, vision_heads=2)
