"""Every registered method on every shipped model config: where ``withdraw()`` refuses the method on the model's
family, the pipeline refuses it too, before any weights load (``mode=flops``, and the config check of every mode),
with the same one-line message naming the method and the family; where ``withdraw()`` takes it, ``mode=flops``
plans it. The two sides ask one check (:meth:`vtw.methods.Reduction.check_supported`); this test holds them to it.
The same for videos (``mode=flops flops.video_frames=N`` against a video prompt under ``withdraw()``), on the models
whose family takes videos through a fixed-resolution tower (the video sample ``mode=flops`` plans).

Each method runs at its default reducing setting, as ``python run.py vtw.method=<name> model=<model>`` builds it:
the model's ``default_layer`` and the method's own defaults (the pipeline's :func:`build_method`; on the tiny model,
at half its depth). Which pairs are refused is not listed here: ``withdraw()`` on a tiny model of the family says.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny_models import Sample, build_tiny_model, make_singles

from vtw import withdraw
from vtw.families import family
from vtw.flops import plan_flops
from vtw.io import read_json
from vtw.methods import METHODS
from vtw.pipeline.config import (
    CONF_DIR,
    ConfigError,
    build_method,
    compose_config,
    resolved_config,
    validate_config,
)
from vtw.pipeline.job import JobContext, run_job

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TINY_LAYERS = 4


@functools.cache
def _composed(model: str) -> dict:
    """``python run.py model=<model> mode=flops`` composed and resolved (the ``vtw`` group does not depend on the
    method: :func:`_config` sets ``vtw.method`` in it, as the override would)."""
    return resolved_config(compose_config([f"model={model}", "mode=flops", "logger=none"]))


def _config(method: str, model: str) -> dict:
    """``python run.py vtw.method=<method> model=<model> mode=flops``, resolved."""
    base = _composed(model)
    return {**base, "vtw": {**base["vtw"], "method": method}}


@functools.cache
def _family_of(model: str) -> str:
    """``model_type`` of a shipped model config (its HF config, read offline; no weights)."""
    return validate_config(_config("vtw", model)).model.family


def _fixed_video(model: str) -> bool:
    """Whether ``mode=flops flops.video_frames=N`` plans a video for ``model``: a video family with a fixed-resolution
    tower (the Qwen families take their videos as patch grids)."""
    spec = family(_family_of(model))
    return spec.takes_video and spec.encoder == "fixed"


PAIRS = [(method, model) for method in METHODS for model in MODELS]
CASES = [(m, model, "image") for m, model in PAIRS] + [(m, model, "video") for m, model in PAIRS if _fixed_video(model)]


@functools.cache
def _tiny(model_type: str):
    return build_tiny_model(model_type, num_layers=TINY_LAYERS)


@functools.cache
def _withdraw_refusal(method: str, model_type: str, workload: str = "image") -> str | None:
    """``withdraw()``'s refusal of ``method`` (default setting) on a tiny model of the family, before any forward;
    where it takes it, one prompt of one image (or one video) runs through the model under the method: ``None``, or
    for a video, the method's refusal of that family's videos (an image must work). Where the default setting
    changes nothing on the tiny model (VisionZip's 54+10 tokens of 16 patches), the setting of least compute along
    the method's free parameter runs instead, so that the method acts."""
    model = _tiny(model_type)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        reduction = build_method(method, TINY_LAYERS // 2, {})
        handle = withdraw(model, method=reduction)
        if not handle.active and reduction.budget_candidates(TINY_LAYERS):
            handle.remove()
            handle = withdraw(model, method=reduction.budget_candidates(TINY_LAYERS)[0])
        assert handle.active, handle
    except ValueError as e:
        assert not calls, "the refusal must come before any forward"
        return str(e)
    finally:
        hook.remove()
    with handle, torch.no_grad():
        (prompt,) = make_singles(model, [Sample(videos=1) if workload == "video" else Sample(images=1)])
        try:
            model(**prompt)
        except ValueError as e:
            if workload != "video":
                raise
            return str(e)
    return None


@pytest.mark.parametrize(("method", "model", "workload"), CASES)
def test_mode_flops_refuses_what_withdraw_refuses_and_plans_the_rest(method, model, workload, tmp_path):
    model_type = _family_of(model)
    refusal = _withdraw_refusal(method, model_type, workload)
    display = family(model_type).display
    config = _config(method, model)
    frames = config["model"]["max_frames_num"] if workload == "video" else 0  # the frames the pipeline samples
    config = {**config, "flops": {**config["flops"], "video_frames": frames}}
    run = functools.partial(run_job, config, JobContext(output_dir=tmp_path), console=Console(file=io.StringIO()))
    if refusal is None:
        assert run().status == "ok"
        plan = read_json(tmp_path / "flops.json")
        assert plan["model"] == model and len(plan["rows"]) >= 2, plan
        assert (plan["vision_tokens"] > 0) and (f"{frames} frames" in plan["encoder"]) == bool(frames), plan
        validate_config({**config, "mode": "eval"})
        return
    assert "\n" not in refusal and method in refusal and display in refusal, refusal
    with pytest.raises(ConfigError) as info:
        run()
    message = str(info.value)
    assert "\n" not in message and refusal in message, (message, refusal)
    assert f"vtw.method={method}" in message and f"model={model}" in message, message
    assert not (tmp_path / "flops.json").exists()
    assert read_json(tmp_path / "job.json")["error"] == message
    if not frames:  # mode=eval: refused as well, before the weights load (the dataset's videos: at the first one)
        with pytest.raises(ConfigError) as info:
            validate_config({**config, "mode": "eval"})
        assert str(info.value) == message
    layer = config["vtw"]["layer"]  # the FLOPs model asked directly (what mode=flops calls): the same refusal
    with pytest.raises(ValueError) as info:
        plan_flops(config["model"]["config"], text_tokens=64, generated_tokens=16, video_frames=frames,
                   method=build_method(method, layer, {}), console=Console(file=io.StringIO()))  # fmt: skip
    assert str(info.value) == refusal


def test_some_pairs_are_refused_and_some_taken():
    """The matrix above tests both ways: it holds refused and taken cases, of images and of videos."""
    refused = {case for case in CASES if _withdraw_refusal(case[0], _family_of(case[1]), case[2]) is not None}
    for workload in ("image", "video"):
        cases = {case for case in CASES if case[2] == workload}
        assert cases & refused, f"no method is refused on any model's {workload}s: the matrix tests one way only"
        assert cases - refused, f"every method is refused on every model's {workload}s"


def test_run_py_prints_the_refusal_as_one_line_and_exits_1(tmp_path):
    """``python run.py vtw.method=<m> model=<model> mode=flops`` on the first refused pair: one line on stderr."""
    method, model = next((m, model) for m, model in PAIRS if _withdraw_refusal(m, _family_of(model)) is not None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "run.py"), f"vtw.method={method}", f"model={model}", "mode=flops",
           f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"vtw.method={method} with model={model}" in lines[0], p.stderr
    assert _withdraw_refusal(method, _family_of(model)) in lines[0]
