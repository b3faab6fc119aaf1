"""Per-request FLOPs accounting of the ``vtw`` lmms-eval model.

:class:`FlopsMeter` reads, from each processed batch, every sample's vision/text token counts and vision-encoder
workload (:class:`SampleCost`), and appends one :class:`~vtw.lmms.records.RequestRecord` per request: exact FLOPs
(:func:`vtw.flops.count_flops`) and the papers' convention (:func:`vtw.flops.paper_flops`), each at the layer in
force and at ``K = L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..families import get_family, num_decoder_layers, vision_token_mask
from ..flops import SampleCounts, VisionWorkload, count_flops, paper_flops, workload_from_inputs
from ..grids import SampleLayout, input_layouts
from ..methods import Reduction
from .inputs import Prepared
from .records import RequestRecord


@dataclass(frozen=True)
class SampleCost:
    """What one sample of a processed batch sends through the model.

    Attributes:
        work: its vision-encoder workload (:class:`vtw.flops.VisionWorkload`).
        vision_tokens: its vision (image and video placeholder) tokens; text_tokens: its other non-padding tokens.
        layout: its image and video grids (what methods acting before the decoder count by), ``None`` where the
            family's tokens do not form grids.
    """

    work: VisionWorkload
    vision_tokens: int
    text_tokens: int
    layout: SampleLayout | None = None

    @property
    def input_tokens(self) -> int:
        return self.vision_tokens + self.text_tokens


class FlopsMeter:
    """Records of the requests served with one model config (``model.config``)."""

    def __init__(self, config) -> None:
        self.config = config
        self.family = get_family(config)
        self.num_layers = num_decoder_layers(config)
        self.records: list[RequestRecord] = []

    def pop(self) -> list[RequestRecord]:
        """The records since the last call (and forget them)."""
        out, self.records = self.records, []
        return out

    def token_counts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per row of ``(B, T)`` ids and mask: (vision tokens, other non-padding tokens)."""
        vision = vision_token_mask(self.config, input_ids) & attention_mask.bool()
        n_vision = vision.sum(1)
        n_text = attention_mask.bool().sum(1) - n_vision
        return n_vision.tolist(), n_text.tolist()

    def prompt(self, inputs) -> SampleCounts:
        """The counts of a one-sample batch (``inputs``: the processor's output) for :mod:`vtw.flops.budget`."""
        n_vision, n_text = self.token_counts(inputs["input_ids"], inputs["attention_mask"])
        keys = {"pixel_values": self.family.image_key, "image_sizes": "image_sizes", "image_grid_thw": "image_grid_thw",
                "pixel_values_videos": self.family.video_key, "video_grid_thw": "video_grid_thw"}  # fmt: skip
        cols = {k: inputs.get(v) if v is not None else None for k, v in keys.items()}
        work = workload_from_inputs(self.config, **cols)  # a Qwen workload reads the grids only
        return SampleCounts.of(work, int(n_vision[0]), int(n_text[0]), vision_layout=self.layouts(inputs)[0])

    def layouts(self, inputs) -> list[SampleLayout | None]:
        """Per sample of a processed batch, its image and video grids (:func:`vtw.grids.input_layouts`); ``None``
        for every sample where the family's tokens do not form grids (e.g. a SigLIP tower dropping its first patch)."""
        try:
            return list(input_layouts(self.config, inputs["input_ids"], inputs))
        except ValueError:
            return [None] * len(inputs["input_ids"])

    def costs(self, inputs, batch: Sequence[Prepared]) -> list[SampleCost]:
        """Per sample of a processed batch (``inputs``: the processor's output for ``batch``), its cost."""
        n_vision, n_text = self.token_counts(inputs["input_ids"], inputs["attention_mask"])
        return [SampleCost(*c) for c in zip(self.workloads(inputs, batch), n_vision, n_text, self.layouts(inputs))]

    def workloads(self, inputs, batch: Sequence[Prepared]) -> list[VisionWorkload]:
        """Per sample of a processed batch, its vision-encoder workload (:class:`vtw.flops.VisionWorkload`).

        The processor stacks the images (videos) of all samples in order along dim 0 of the family's image key /
        ``image_sizes`` / ``image_grid_thw`` (``pixel_values_videos`` / ``video_grid_thw``): slice each sample's.
        """

        def rows(name: str | None, counts: list[int]) -> list:
            t = inputs.get(name) if name is not None else None
            if t is None:
                return [None] * len(counts)
            out, start = [], 0
            for n in counts:
                out.append(t[start : start + n] if n else None)
                start += n
            return out

        n_img = [len(p.images) for p in batch]
        n_vid = [len(p.videos) for p in batch]
        cols = {
            "pixel_values": rows(self.family.image_key, n_img),
            "image_sizes": rows("image_sizes", n_img),
            "image_grid_thw": rows("image_grid_thw", n_img),
            "pixel_values_videos": rows(self.family.video_key, n_vid),
            "video_grid_thw": rows("video_grid_thw", n_vid),
        }  # Qwen: pixel_values are flattened patches, which its workload does not read (the grids say everything)
        return [workload_from_inputs(self.config, **{k: v[b] for k, v in cols.items()}) for b in range(len(batch))]

    def record(
        self,
        p: Prepared,
        kind: str,
        cost: SampleCost,
        *,
        method: Reduction,
        generated: int,
        logits: int,
        latency: float,
        batch_size: int,
        first_token: dict | None = None,
        layer_tokens=None,
    ) -> None:
        """Append the :class:`RequestRecord` of one request (FLOPs under ``method`` and of the full model).

        Args:
            kind: ``"generate_until"`` or ``"loglikelihood"``.
            generated: generated tokens; logits: prefill positions whose logits were computed.
            latency: seconds of model call per request of the batch; batch_size: requests in that batch.
            first_token: ``first_token_id`` / ``_agree`` / ``_kl`` of a generate request (see RequestRecord).
            layer_tokens: the realized ``(vision, text)`` tokens of each decoder layer in this request's prefill (its
                row of :attr:`vtw.WithdrawalHandle.last_layer_tokens`), from which ``flops`` is counted; ``None``:
                the method's declared counts.
        """
        cfg, n_vision, n_text = self.config, int(cost.vision_tokens), int(cost.text_tokens)
        sample = SampleCounts.of(cost.work, n_vision, n_text, generated, vision_layout=cost.layout)
        expected = count_flops(cfg, sample, method, prefill_logits=logits)
        report = expected if layer_tokens is None else count_flops(cfg, sample, method, prefill_logits=logits,
                                                                   layer_tokens=layer_tokens)  # fmt: skip
        flops = report.total
        full = count_flops(cfg, sample, prefill_logits=logits).total
        layer = report.layer if report.layer is not None and report.layer < self.num_layers else None  # K = L: none
        self.records.append(
            RequestRecord(
                task=p.task,
                doc_id=p.doc_id,
                request_type=kind,
                layer=layer,
                vision_tokens=n_vision,
                text_tokens=n_text,
                generated_tokens=int(generated),
                images=len(p.images) + len(p.videos),
                latency_s=latency,
                batch_size=batch_size,
                flops=float(flops),
                flops_full=float(full),
                paper_flops=float(paper_flops(cfg, sample, method)),
                paper_flops_full=float(paper_flops(cfg, sample)),
                flops_expected=float(expected.total),
                **(first_token or {}),
            )
        )

    @staticmethod
    def log_throughput(records: Sequence[RequestRecord], layer: int | None) -> None:
        """Surface totals in lmms-eval's own ``results["throughput"]`` (its CLI shows them)."""
        if not records:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        elapsed = sum(r.latency_s for r in records)
        gen = sum(r.generated_tokens for r in records)
        flops = sum(r.flops for r in records)
        full = sum(r.flops_full for r in records)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=gen,
            avg_speed=gen / elapsed if elapsed > 0 else 0.0,
            additional_metrics={
                "requests": len(records),
                "tflops_per_request": flops / len(records) / 1e12,
                "tflops_saved_pct": 100.0 * (1.0 - flops / full) if full > 0 else 0.0,
                "vtw_layer": -1 if layer is None else layer,
            },
        )
