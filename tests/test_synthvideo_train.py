"""The trained tiny Video-LLaVA (``python -m vtw_train synthvideo``): the shipped checkpoint is small and above chance
on the shipped test clips read through the eval path; train-time pixels, tokens, patch labels and the simulated
withdrawal agree with the processor, a naive pixel count and the model's own forward / `vtw.withdraw`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

from vtw.families import family
from vtw.lmms.inputs import InputBuilder
from vtw.synthvideo import generator as G
from vtw.synthvideo.tiny import ASSET_DIR, prompt_text
from vtw_train import synthvideo as vt
from vtw_train.core import save_checkpoint

CLIPS = Path(__file__).resolve().parent.parent / "vtw" / "assets" / "tasks" / "vtw_synthvideo" / "videos"


@pytest.fixture(scope="module")
def shipped():
    model = VideoLlavaForConditionalGeneration.from_pretrained(ASSET_DIR, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(ASSET_DIR)


def test_shipped_checkpoint_is_small_and_sized_for_64_px_frames(shipped):
    model, processor = shipped
    assert sum(p.stat().st_size for p in ASSET_DIR.iterdir()) <= 25e6
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (64, 16)
    enc = processor(text=["<video>"], videos=[G.make_item("test", 0).render()], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.video_token_index).sum()) == 8 * (16 + 1) == vt.CLIP_TOKENS


def test_shipped_model_is_above_chance_on_the_first_test_clips(shipped):
    """The four answers of each clip ranked by the first answer token's logit, frames decoded from the shipped MP4s
    by `InputBuilder.load_videos`; chance is 0.25 (the DESIGN numbers: about 0.8 on all 300)."""
    model, processor = shipped
    builder = InputBuilder(processor, family("video_llava"), device=torch.device("cpu"), dtype=torch.float32)
    tok = processor.tokenizer
    right = {kind: [] for kind in G.KINDS}
    for i in range(30):
        item = G.make_item("test", i)
        enc = builder.encode([builder.prompt(item.prompt, 0, 1)], [], [str(CLIPS / f"test-{i:06d}.mp4")])
        with torch.no_grad():
            logits = model(**enc).logits[0, -1]
        choices = list(item.choices)
        best = choices[int(logits[tok.convert_tokens_to_ids(choices)].argmax())]
        right[item.kind].append(best == item.answer)
    overall = np.mean([v for vs in right.values() for v in vs])
    assert overall >= 0.6, right
    assert all(np.mean(v) > 0.25 for v in right.values()), right


def test_train_pixels_equal_the_video_processor(shipped):
    _, processor = shipped
    clip = G.make_item("train", 5).render()
    ref = processor.video_processor(videos=[clip], return_tensors="pt")["pixel_values_videos"]
    ours = vt.pixel_values_videos(processor, clip[None])
    assert ours.shape == ref.shape == (1, 8, 3, 64, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8 clips"):
        vt.pixel_values_videos(processor, clip.astype(np.float32)[None])


def _naive_owner(objects):
    """Per patch: the object whose box holds most of the patch's pixels (>= MIN_OVERLAP; first on ties), by counting."""
    owner = []
    for p in range(vt.NUM_PATCHES):
        x0, y0 = (p % vt.GRID) * vt.PATCH, (p // vt.GRID) * vt.PATCH
        counts = []
        for obj in objects:
            left, top, right, bottom = obj.box
            xs = [x for x in range(x0, x0 + vt.PATCH) if left <= x <= right]
            ys = [y for y in range(y0, y0 + vt.PATCH) if top <= y <= bottom]
            counts.append(len(xs) * len(ys))
        k = int(np.argmax(counts)) if counts else 0
        owner.append(k + 1 if counts and counts[k] >= vt.MIN_OVERLAP else 0)
    return owner


def test_patch_owner_and_frame_targets_match_a_naive_count():
    from vtw.synthvqa.generator import SceneObject

    # hand-derived: a 12 px box centred at (20, 8) spans x 14..25, y 2..13: patch 0 holds 2 x 12 = 24 px, patch 1 120
    obj = SceneObject("circle", "red", 20, 8, 12)
    assert vt.patch_owner([obj]).tolist() == [1, 1] + [0] * 14
    for i in range(12):
        for objects in G.make_item("train", i).frames:
            assert vt.patch_owner(objects).tolist() == _naive_owner(objects)
    item = G.make_item("train", 0)  # direction: frame 0 holds the standing shape, then the mover
    labels, present = vt.frame_targets(item.frames[0])
    mover = item.frames[0][1]
    rows = labels[vt.patch_owner(item.frames[0]) == 2]
    assert len(rows) and (rows == [1 + G.SHAPES.index(mover.shape), 1 + list(G.COLORS).index(mover.color),
                                   1 + mover.cx // 8, 1 + mover.cy // 8]).all()  # fmt: skip
    assert present.sum() == len({o.shape for o in item.frames[0]})


def test_batch_tokens_equal_the_processor_and_the_guidance_points_at_the_answer(shipped):
    model, processor = shipped
    items = [G.make_item("train", i) for i in range(6)]
    batch = vt.make_batch(processor, items)
    builder = InputBuilder(processor, family("video_llava"), device=torch.device("cpu"), dtype=torch.float32)
    video = model.config.video_token_index
    for b, item in enumerate(items):
        assert prompt_text(processor, item) == builder.prompt(item.prompt, 0, 1)
        text = prompt_text(processor, item) + " " + item.answer + "</s>"
        ref = processor(text=[text], videos=[item.render()], return_tensors="pt")["input_ids"][0]
        n = int(batch.attention_mask[b].sum())
        assert batch.input_ids[b, :n].tolist() == ref.tolist()
        labelled = (batch.labels[b] != -100).nonzero().flatten().tolist()
        answer = processor.tokenizer.convert_ids_to_tokens(batch.labels[b, n - 2 : n].tolist())
        assert labelled == [n - 2, n - 1] and answer == [item.answer, "</s>"]
        start = ref.tolist().index(video)
        for head in (0, 1):
            hit = batch.find_targets[head, b].nonzero().flatten()
            assert len(hit) and bool((ref[hit] == video).all())
        if item.kind == "direction":  # head 0 on frame 0, head 1 on the last frame
            frame = (batch.find_targets[:, b].nonzero()[:, 1] - start) // vt.FRAME_TOKENS
            heads = batch.find_targets[:, b].nonzero()[:, 0]
            assert set(frame[heads == 0].tolist()) == {0} and set(frame[heads == 1].tolist()) == {7}
        word = processor.tokenizer.decode([int(ref[batch.find_queries[b, 1]])])
        assert word == (vt.FIND_WORDS[item.kind] or item.question.split()[-2])
        assert int(batch.relay_queries[b, 1]) == n - 3 and batch.relay_targets[b].sum() == 1


def test_masked_forward_matches_the_model_and_vtw_withdraw(shipped):
    from vtw import withdraw

    model, processor = shipped
    items = [G.make_item("train", i) for i in range(3)]
    batch = vt.make_batch(processor, items)
    layers = model.config.text_config.num_hidden_layers
    n = int(batch.attention_mask[0].sum())
    one = vt.VideoBatch(*(getattr(batch, f)[:1, :n] if f in ("input_ids", "attention_mask", "labels") else
                          getattr(batch, f)[:1] for f in ("input_ids", "attention_mask", "labels", "pixels")),
                        batch.find_queries, batch.find_targets, batch.find_spread, batch.relay_queries,
                        batch.relay_targets)  # fmt: skip
    with torch.no_grad():
        ref = model(input_ids=one.input_ids, attention_mask=one.attention_mask, pixel_values_videos=one.pixels).logits
        ours = model.lm_head(vt.masked_forward(model, one, torch.tensor([layers])))
        torch.testing.assert_close(ours[0, n - 3], ref[0, n - 3], atol=1e-4, rtol=1e-4)
        prompt = dict(input_ids=one.input_ids[:, : n - 2], attention_mask=one.attention_mask[:, : n - 2],
                      pixel_values_videos=one.pixels)  # fmt: skip
        handle = withdraw(model, layer=2)
        try:
            withdrawn = model(**prompt).logits[0, -1]
        finally:
            handle.remove()
        ours = model.lm_head(vt.masked_forward(model, one, torch.tensor([2])))[0, n - 3]
        torch.testing.assert_close(ours, withdrawn, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(withdrawn, ref[0, n - 3], atol=1e-3)  # withdrawal changes the answer logits


def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path):
    config = vt.VideoTrainConfig(steps=2, batch_size=3, vision_steps=2, vision_clips=1, warmup_steps=1)
    model, processor, report = vt.train(config, progress=False)
    assert report.config == config and np.isfinite(report.final_loss) and report.seconds > 0
    save_checkpoint(model, processor, tmp_path / "ckpt")
    again = VideoLlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"steps": 0}, "steps"), ({"text_layers": 1}, "text_layers"), ({"withdraw_prob": 1.5}, "withdraw_prob"),
     ({"guide_weight": -1.0}, "guide_weight"), ({"warmup_steps": 2000}, "warmup_steps"),
     ({"vision_steps": -1}, "vision_steps"), ({"text_width": 30}, "multiples")],
)  # fmt: skip
def test_bad_training_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vt.VideoTrainConfig(**kwargs)
    with pytest.raises(ValueError, match="threads"):
        vt.parse_args(["--threads", "0"])
