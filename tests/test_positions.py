"""``positions=compact`` is refused on the M-RoPE families in one line, before anything runs: by ``withdraw()`` (no hook
installed), by the pipeline's config check on every shipped model of such a family (before any weights, whatever
the mode), and by the lmms-eval model's arguments (before ``from_pretrained``). A value outside ``keep | compact`` is
refused the same way everywhere. (That ``compact`` renumbers correctly on the other families is checked against the
naive reference for every registered method in tests/test_conformance.py.)"""

from __future__ import annotations

import pytest
from tiny_models import FAMILIES, build_tiny_model

from vtw import withdraw
from vtw.families import family, get_family
from vtw.pipeline.config import CONF_DIR, ConfigError, compose_config, load_model_config_for, validate_config

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", FAMILIES)
def test_withdraw_refuses_compact_on_mrope_only(name):
    model = build_tiny_model(name, num_layers=2)
    if family(name).mrope:
        with pytest.raises(ValueError, match=rf"^positions=compact is not defined for {family(name).display}: .*3-D"):
            withdraw(model, layer=1, positions="compact")
        assert _hooks(model) == 0
    else:
        handle = withdraw(model, layer=1, positions="compact")
        assert handle.positions == "compact" and handle.label == "vtw K=1 positions=compact"
        handle.remove()
    with pytest.raises(ValueError, match=r"^positions='sideways' is not allowed; allowed: keep, compact$"):
        withdraw(model, layer=1, positions="sideways")
    assert _hooks(model) == 0


@pytest.mark.parametrize("model", MODELS)
def test_config_refuses_compact_on_mrope_models_before_any_weights(model):
    composed = compose_config([f"model={model}", "vtw.positions=compact", "mode=flops", "logger=none"])
    spec_model = composed.model
    config = load_model_config_for(spec_model.pretrained, spec_model.get("config"))
    if get_family(config).mrope:
        with pytest.raises(ConfigError) as err:
            validate_config(composed)
        text = str(err.value)
        assert text.startswith(f"vtw.positions=compact with model={model}: positions=compact is not defined for ")
        assert "\n" not in text
    else:
        assert validate_config(composed).vtw.positions == "compact"


def test_config_and_model_args_refuse_a_value_not_allowed(tiny_llava_dir, tiny_qwen_dir, monkeypatch):
    import transformers

    from vtw.lmms.model import VTWModel

    with pytest.raises(ConfigError, match=r"^vtw.positions='sideways' is not allowed; allowed: keep, compact$"):
        validate_config(compose_config(["vtw.positions=sideways"]))

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    for cls in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", boom)
    with pytest.raises(ValueError, match=r"^vtw model: positions=compact is not defined for Qwen2-VL"):
        VTWModel(pretrained=str(tiny_qwen_dir), device="cpu", positions="compact")
    with pytest.raises(ValueError, match=r"^vtw model: positions='sideways' is not allowed"):
        VTWModel(pretrained=str(tiny_llava_dir), device="cpu", positions="sideways")
