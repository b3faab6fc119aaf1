"""Video requests through the ``vtw`` lmms-eval model, for every video family (Video-LLaVA, LLaVA-NeXT-Video,
LLaVA-OneVision, Qwen2-VL; tiny models with their processors built locally, clips of the shipped ``vtw_synthvideo``
task read through the model's own loader): batches mixing video, image + video and image requests == each request
alone == plain transformers; ``max_frames_num`` frames reach the model; each request's FLOPs record ==
FlopCounterMode over its ``generate``; under VTW at K the KV cache of layers >= K holds text only; an unreadable video
fails its own request only, with a message naming the file and the document."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_flops import flop_counter
from test_lmms_fixtures import VIDEO_FAMILIES, build_tiny_video_model, build_tiny_video_tasks

from vtw import withdraw
from vtw.lmms.model import VTWModel

CLIPS = Path(__file__).resolve().parent.parent / "vtw" / "assets" / "tasks" / "vtw_synthvideo" / "videos"
NUM_LAYERS = 4


def video_tokens(family: str, frames: int) -> int:
    """Placeholder tokens of one 64 x 64 clip of ``frames`` frames, derived by hand from the tiny configs (32 px
    towers, 8 px patches: 4 x 4 patches per frame; Qwen2-VL: frames resized to 32 x 32, 4 px patches, 2 x 2 merge,
    2 frames per temporal patch)."""
    per = {
        "video_llava": 16 + 1,  # every patch and the CLS token of each frame
        "llava_next_video": 2 * 2,  # 4 x 4 patches average-pooled with stride 2
        "llava_onevision": 2 * 2,  # 4 x 4 patches resized to ceil(4 / 2) squared
        "qwen2_vl": (32 // 4) ** 2 // 4 // 2,  # 8 x 8 patches, 2 x 2 merged, per frame of a 2-frame patch
    }[family]
    return per * frames + (1 if family == "llava_onevision" else 0)  # OneVision: one newline token per video


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory):
    return build_tiny_video_model(tmp_path_factory.mktemp(family), family, num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def ref_model(model_dir):
    import transformers
    from transformers import AutoConfig

    from vtw import get_family

    cls = getattr(transformers, get_family(AutoConfig.from_pretrained(model_dir)).model_class)
    return cls.from_pretrained(model_dir).eval()


def _tasks(root: Path, videos: list[str], prefix: str):
    from lmms_eval.tasks import TaskManager, get_task_dict

    names = build_tiny_video_tasks(root, videos, prefix=prefix)
    tasks = get_task_dict(list(names.values()), TaskManager(include_path=str(root), include_defaults=False))
    for t in tasks.values():
        t.build_all_requests(limit=None, rank=0, world_size=1)
    return names, tasks


@pytest.fixture(scope="module")
def video_tasks(tmp_path_factory):
    """Six docs: video only (0, 3), image + video (1, 4), image only (2, 5)."""
    return _tasks(tmp_path_factory.mktemp("vtasks"), [str(CLIPS / f"test-{i:06d}.mp4") for i in range(6)], "vtwvid")


def _model(path, tasks, **kw) -> VTWModel:
    lm = VTWModel(pretrained=str(path), device="cpu", progress=False, **kw)
    for name, t in tasks[1].items():
        lm.task_dict[name] = t.dataset
    return lm


def _doc(lm, req):
    context, _, doc_to_visual, doc_id, task, split = req.args
    return lm.task_dict[task][split][doc_id]


@pytest.mark.parametrize("layer", [None, 2])
def test_mixed_batches_equal_each_request_alone_and_plain_transformers(model_dir, video_tasks, ref_model, layer):
    from transformers.video_utils import load_video

    names, tasks = video_tasks
    reqs = tasks[names["gen"]].instances[:4]  # video, image + video, image, video
    lm4 = _model(model_dir, video_tasks, batch_size=4, layer=layer)
    lm1 = _model(model_dir, video_tasks, batch_size=1, layer=layer)
    lm4.first_token_store, lm1.first_token_store = {}, {}  # each request's first-token log-distribution (V,)
    batched = [r.text for r in lm4.generate_until(reqs)]
    assert batched == [r.text for r in lm1.generate_until(reqs)]
    assert lm4.first_token_store.keys() == lm1.first_token_store.keys() and len(lm1.first_token_store) == 4
    for key, logprobs in lm1.first_token_store.items():
        torch.testing.assert_close(lm4.first_token_store[key], logprobs, atol=1e-4, rtol=1e-4)
    for i in (0, 1):  # video only; image + video: the processor on frames decoded here, generate under withdraw
        context, gen_kwargs, doc_to_visual, _, _, _ = reqs[i].args
        visuals = doc_to_visual(_doc(lm1, reqs[i]))
        frames = load_video(visuals[-1], num_frames=8)[0]
        images = {"images": visuals[:-1]} if len(visuals) > 1 else {}
        prompt = lm1.inputs.prompt(context, len(visuals) - 1, 1)
        batch = lm1.processor(text=[prompt], videos=[frames], return_tensors="pt", **images)
        with torch.no_grad(), withdraw(ref_model, layer=layer):
            ids = ref_model.generate(**batch, max_new_tokens=gen_kwargs["max_new_tokens"], do_sample=False)
        text = lm1.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert batched[i] == text.split(".")[0]
        assert int((batch["input_ids"] == ref_model.config.video_token_id).sum()) > 0


def test_loglikelihood_mixed_batch_equals_each_request_alone(model_dir, video_tasks):
    names, tasks = video_tasks
    reqs = tasks[names["mc"]].instances[1:11]  # 4 choices each of video, image + video, image docs
    batched = [r.text for r in _model(model_dir, video_tasks, batch_size=10, layer=2).loglikelihood(reqs)]
    single = [r.text for r in _model(model_dir, video_tasks, batch_size=1, layer=2).loglikelihood(reqs)]
    for (nll_b, greedy_b), (nll_1, greedy_1) in zip(batched, single):
        assert nll_b == pytest.approx(nll_1, rel=1e-4, abs=1e-5) and greedy_b == greedy_1


@pytest.mark.parametrize("frames", [8, 4])
def test_max_frames_num_frames_reach_the_model(family, model_dir, video_tasks, frames):
    names, tasks = video_tasks
    reqs = [r for r in tasks[names["gen"]].instances if r.args[3] % 3 == 0]  # the video-only docs
    lm = _model(model_dir, video_tasks, batch_size=2, layer=None, max_frames_num=frames)
    seen = []
    hook = lm.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("pixel_values_videos")), with_kwargs=True
    )
    try:
        lm.generate_until(reqs)
    finally:
        hook.remove()
    records = lm.pop_records()
    assert [r.vision_tokens for r in records] == [video_tokens(family, frames)] * len(reqs)
    pixels = next(p for p in seen if p is not None)
    if family == "qwen2_vl":  # flattened patches: (videos x t x h x w, C x 2 x 4 x 4)
        assert pixels.shape[0] == len(reqs) * (frames // 2) * 8 * 8
    else:  # (videos, frames, C, H, W)
        assert tuple(pixels.shape[:2]) == (len(reqs), frames)


@pytest.mark.parametrize("layer", [None, 2, 0])
def test_video_request_flops_equal_flop_counter_mode(model_dir, video_tasks, layer):
    names, tasks = video_tasks
    lm = _model(model_dir, video_tasks, batch_size=1, layer=layer)
    lm.warmed_up = True  # no untimed warm-up forward inside the counted call
    for req in tasks[names["gen"]].instances[:2]:  # video only; image + video
        with flop_counter() as counter:
            lm.generate_until([req])
        (record,) = lm.pop_records()
        assert record.flops == counter.get_total_flops() > 0
        assert record.vision_tokens > video_tokens(lm.family.model_type, 8) - 1
        if layer is None:
            assert record.flops_full == record.flops


def test_vtw_withdraws_every_frame_from_the_deep_kv_cache(model_dir, video_tasks):
    names, tasks = video_tasks
    reqs = tasks[names["gen"]].instances[:3]  # video; image + video; image
    lm = _model(model_dir, video_tasks, batch_size=3, layer=2)
    prepared = [lm.inputs.prepare(i, r, lm._doc, loglik=False) for i, r in enumerate(reqs)]
    assert lm.inputs.read_videos(prepared) == {}
    inputs = lm.inputs.encode([p.prompt for p in prepared], [x for p in prepared for x in p.images],
                              [x for p in prepared for x in p.videos])  # fmt: skip
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    video = (ids == lm.config.video_token_id) & mask
    assert video[:2].sum(1).min() > 0 and video[2].sum() == 0
    text = (mask & (ids != lm.config.image_token_id) & ~video).sum(1)  # the ids from the config, not the registry
    with torch.no_grad():
        cache = lm.model(**inputs, use_cache=True).past_key_values
    lengths = [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)]
    assert lengths == [ids.shape[1]] * 2 + [int(text.max())] * 2


def test_an_unreadable_video_fails_its_own_request_only(tmp_path, caplog):
    model_dir = build_tiny_video_model(tmp_path / "m", "video_llava", num_layers=NUM_LAYERS)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    good = [str(CLIPS / "test-000000.mp4"), str(CLIPS / "test-000003.mp4")]
    videos = [good[0], str(tmp_path / "no-such-clip.mp4"), "", str(garbage), good[1], ""]
    tasks = _tasks(tmp_path / "tasks", videos, "vtwbad")
    names = tasks[0]
    reqs = tasks[1][names["gen"]].instances
    lm = _model(model_dir, tasks, batch_size=6, layer=2)
    with caplog.at_level("ERROR", logger="vtw"):
        out = [r.text for r in lm.generate_until(reqs)]
    assert out[1] == out[3] == ""
    assert sorted(lm.failures) == [(names["gen"], 1), (names["gen"], 3)]
    assert "no-such-clip.mp4" in lm.failures[(names["gen"], 1)] and "doc 1" in lm.failures[(names["gen"], 1)]
    assert "garbage.mp4" in lm.failures[(names["gen"], 3)] and "doc 3" in lm.failures[(names["gen"], 3)]
    assert "no-such-clip.mp4" in caplog.text and "garbage.mp4" in caplog.text
    served = [r.doc_id for r in lm.pop_records()]
    assert sorted(served) == [0, 2, 4, 5]
    alone = _model(model_dir, tasks, batch_size=1, layer=2)
    assert [out[i] for i in (0, 2, 4, 5)] == [r.text for r in alone.generate_until([reqs[i] for i in (0, 2, 4, 5)])]
    mc = [r.text for r in lm.loglikelihood(tasks[1][names["mc"]].instances)]
    assert all(nll == float("inf") for nll, _ in mc[4:8]) and all(nll < float("inf") for nll, _ in mc[:4])
