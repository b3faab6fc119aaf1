"""The second embedded checkpoint, `tiny-llava-plain` (vtw/assets/tiny-llava-plain): the synthvqa recipe without the
withdrawal curriculum (`python -m vtw_train synthvqa --plain`). It loads through `conf/model/tiny-llava-plain.yaml`, it
is not tiny-llava (same architecture and stage 1, another decoder), and it answers a fixed slice of the test split
far above chance."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw import withdraw
from vtw.pipeline.config import CONF_DIR, compose_config, validate_config
from vtw.synthvqa.generator import iter_items
from vtw.synthvqa.model import conversation_text
from vtw_train import synthvqa as train_module
from vtw_train.synthvqa import TrainConfig

ASSETS = Path(__file__).resolve().parent.parent / "vtw" / "assets"
PLAIN, DEFAULT = ASSETS / "tiny-llava-plain", ASSETS / "tiny-llava"
SLICE = 50  # the first 50 test items: 10 of each question kind
CHANCE = 0.19  # a blind model on the test split (docs/embedded.md)


@lru_cache(maxsize=1)
def _plain():
    """(model, processor) loaded from where the model config points."""
    spec = validate_config(compose_config(["model=tiny-llava-plain", "logger=none"]))
    model = LlavaForConditionalGeneration.from_pretrained(spec.model.pretrained, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(spec.model.pretrained, local_files_only=True)


def test_model_config_points_at_the_plain_checkpoint():
    spec = validate_config(compose_config(["model=tiny-llava-plain", "logger=none"]))
    assert Path(spec.model.pretrained) == PLAIN and spec.model.name == "tiny-llava-plain"
    assert spec.model.num_layers == 8 and spec.model.family == "llava"
    assert spec.vtw.layer == OmegaConf.load(CONF_DIR / "model" / "tiny-llava-plain.yaml").default_layer
    model, _ = _plain()
    assert model.name_or_path == str(PLAIN) and model.config.text_config.num_hidden_layers == 8
    assert json.loads((PLAIN / "config.json").read_text()) == json.loads((DEFAULT / "config.json").read_text())


def test_plain_is_another_checkpoint_of_the_same_architecture():
    """Same tensors (names, shapes), other values: stage 2 without the curriculum trains every decoder matrix
    elsewhere. (The vision towers differ too: stage 1 is the same seeded run, but it does not reproduce bit for bit
    across machines.)"""
    plain, default = load_file(PLAIN / "model.safetensors"), load_file(DEFAULT / "model.safetensors")
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in default.items()}
    decoder = [k for k in plain if "language_model" in k and plain[k].ndim == 2]
    assert len(decoder) > 50
    for key in decoder:
        assert (plain[key] - default[key]).abs().max() > 1e-3, key


def _correct(model, processor, items, layer: int | None = None) -> list[bool]:
    """Greedy answers (plain HF generate, VTW before `layer` if given) == the items' answers."""
    texts = [conversation_text(processor.tokenizer, [(i.prompt, i.answer)], add_generation_prompt=True) for i in items]
    inputs = processor(images=[i.image() for i in items], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad(), withdraw(model, layer=layer):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() == i.answer for a, i in zip(answers, items)]


def test_plain_answers_a_fixed_slice_far_above_chance():
    model, processor = _plain()
    items = list(iter_items("test", SLICE))
    per_kind: dict[str, list[bool]] = {}
    for ok, item in zip(_correct(model, processor, items), items):
        per_kind.setdefault(item.kind, []).append(ok)
    assert len(per_kind) == 5
    accuracy = sum(sum(v) for v in per_kind.values()) / SLICE
    assert accuracy >= 0.85 > 4 * CHANCE, (accuracy, {k: sum(v) / len(v) for k, v in per_kind.items()})
    assert min(sum(v) / len(v) for v in per_kind.values()) >= 0.6, per_kind


def test_without_the_curriculum_counting_keeps_needing_the_deep_layers():
    """What tells the two apart (docs/embedded.md: the curve by question kind): withdrawn before layer 2,
    tiny-llava still counts about as well as with every layer, the plain checkpoint loses more than a quarter of its
    counting answers. (Colour, shape, position and size questions survive K = 2 in both.)"""
    items = [i for i in iter_items("test", 200) if i.kind == "count"]  # 42 items
    default = LlavaForConditionalGeneration.from_pretrained(DEFAULT, local_files_only=True).eval()
    accuracy = {}
    for name, (model, processor) in {"plain": _plain(), "default": (default, _plain()[1])}.items():
        for layer in (None, 2):
            accuracy[name, layer] = sum(_correct(model, processor, items, layer)) / len(items)
    assert accuracy["plain", 2] <= accuracy["plain", None] - 0.25, accuracy
    assert accuracy["default", 2] >= accuracy["default", None] - 0.1, accuracy


def test_plain_flag_is_the_default_recipe_without_the_curriculum():
    config, output, _ = train_module.parse_args(["--plain"])
    assert config == dataclasses.replace(TrainConfig(), withdraw_prob=0.0) and TrainConfig().withdraw_prob > 0
    assert output == PLAIN and train_module.parse_args([])[1] == DEFAULT
    assert train_module.parse_args(["--plain", "--output", "/tmp/x"])[1] == Path("/tmp/x")
    with pytest.raises(ValueError, match="--plain trains without the withdrawal curriculum, got --withdraw-prob 0.3"):
        train_module.parse_args(["--plain", "--withdraw-prob", "0.3"])


def test_default_layer_is_the_first_k_within_one_point_of_the_baseline():
    """`default_layer` of conf/model/tiny-llava-plain.yaml, measured here on the first 200 test items: withdrawing
    before it costs at most one point of the full model's accuracy, withdrawing one layer earlier costs more."""
    model, processor = _plain()
    items = list(iter_items("test", 200))
    default = OmegaConf.load(CONF_DIR / "model" / "tiny-llava-plain.yaml").default_layer
    accuracy = {k: sum(_correct(model, processor, items, k)) / len(items) for k in (None, default - 1, default)}
    assert accuracy[default] >= accuracy[None] - 0.01 > accuracy[default - 1], accuracy
