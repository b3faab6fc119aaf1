"""vtw.lmms.meter: the per-sample encoder workloads and token counts read from a batched input equal those of each
sample processed alone (the reference: ``vtw.flops.workload_from_inputs`` on an unbatched sample)."""

from __future__ import annotations

import pytest
from test_withdraw import _vision
from tiny_models import FAMILIES, VIDEO_FAMILIES, Sample, build_tiny_model, make_batch, make_singles

from vtw import get_family
from vtw.flops import workload_from_inputs
from vtw.lmms.inputs import Prepared
from vtw.lmms.meter import FlopsMeter


def _alone(model, single: dict):
    spec = get_family(model)
    keys = ("image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    return workload_from_inputs(
        model.config, pixel_values=single.get(spec.image_key), **{k: single[k] for k in keys if k in single}
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_costs_equal_each_sample_alone(family):
    model = build_tiny_model(family, num_layers=1)
    video = int(family in VIDEO_FAMILIES)
    two = 1 if get_family(model).anyres else 2  # anyres: one image per sample (OneVision tiles it)
    samples = [
        Sample(images=1, videos=video, prefix=2, suffix=3, image_shape=(32, 64)),
        Sample(prefix=4, suffix=2),
        Sample(images=two, prefix=1, suffix=2),
        Sample(videos=video, prefix=3, suffix=1),
    ]
    prepared = [Prepared(i, "t", i, "", [None] * s.images, [None] * s.videos) for i, s in enumerate(samples)]
    batch = make_batch(model, samples)
    costs = FlopsMeter(model.config).costs(batch, prepared)
    for cost, single in zip(costs, make_singles(model, samples)):
        assert cost.work == _alone(model, single)
        n_vision = int(_vision(model, single["input_ids"]).sum())
        assert (cost.vision_tokens, cost.input_tokens) == (n_vision, single["input_ids"].shape[1])
    assert costs[1].work.empty and costs[1].vision_tokens == 0
    assert not costs[0].work.empty
