"""``mode=flops`` with ``flops.video_frames``: the planning table of one video, against hand-derived token counts and
the exact FLOPs model (itself equal to FlopCounterMode for video inputs: ``test_flops.py``, ``test_lmms_video.py``)."""

from __future__ import annotations

import pytest

from vtw.flops import SampleCounts, count_flops, load_model_config, paper_flops
from vtw.flops.plan import plan_flops
from vtw.methods import Withdrawal


@pytest.mark.parametrize(
    ("model", "per_frame", "extra"),
    [
        ("video-llava-7b", (224 // 14) ** 2 + 1, 0),  # every patch and the CLS token of each frame
        ("llava-next-video-7b", ((336 // 14) // 2) ** 2, 0),  # 24 x 24 patches pooled with stride 2
        ("llava-onevision-7b", (-(-(384 // 14) // 2)) ** 2, 1),  # 27 x 27 patches resized to 14 x 14, one newline
    ],
)
def test_one_video_sample_of_the_planning_table(model, per_frame, extra):
    cfg = load_model_config(model)
    plan = plan_flops(model, text_tokens=64, generated_tokens=16, video_frames=8, console=_quiet())
    tokens = 8 * per_frame + extra
    assert plan.vision_tokens == tokens and plan.workload.video_frames == 8
    by_k = {r.layer: r for r in plan.rows}
    for k in (None, 16, 0):
        row = by_k[32 if k is None else k] if model != "llava-onevision-7b" else by_k[28 if k is None else k]
        ref = count_flops(
            cfg,
            SampleCounts(vision_tokens=tokens, text_tokens=64, generated_tokens=16, video_frames=8, vision_inputs=0),
            Withdrawal(layer=k),
        )
        assert row.flops == ref.total
        assert row.paper_flops == paper_flops(
            cfg, SampleCounts(vision_tokens=tokens, text_tokens=64), Withdrawal(layer=k)
        )
    assert by_k[0].flops < by_k[16].flops < plan.rows[0].flops


def test_video_frames_for_a_family_without_fixed_frames_is_an_error():
    with pytest.raises(ValueError, match="video_frames=8.*Video-LLaVA"):
        plan_flops("llava-1.5-7b", text_tokens=64, generated_tokens=16, video_frames=8, console=_quiet())
    with pytest.raises(ValueError, match="video_frames=8.*Qwen"):
        plan_flops("qwen2-vl-7b", text_tokens=64, generated_tokens=16, video_frames=8, console=_quiet())


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def test_flops_mode_with_video_frames_plans_one_video(tmp_path):
    """``python run.py mode=flops model=video-llava-7b flops.video_frames=8``: 8 frames x 257 tokens."""
    from vtw.io import read_json
    from vtw.pipeline.config import compose_config
    from vtw.pipeline.job import JobContext, run_job

    cfg = compose_config(["mode=flops", "model=video-llava-7b", "flops.video_frames=8", "logger=none"])
    assert run_job(cfg, JobContext(output_dir=tmp_path)).status == "ok"
    plan = read_json(tmp_path / "flops.json")
    assert plan["vision_tokens"] == 8 * 257 and "8 frames" in plan["encoder"]
    rows = {r["layer"]: r for r in plan["rows"]}
    ref = count_flops(
        load_model_config("video-llava-7b"),
        SampleCounts(vision_tokens=8 * 257, text_tokens=64, generated_tokens=16, video_frames=8, vision_inputs=0),
        Withdrawal(layer=16),
    )
    assert rows[16]["flops"] == ref.total
