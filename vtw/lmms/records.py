"""Per-request measurements of the ``vtw`` lmms-eval model: tokens, FLOPs (two conventions), latency.

One :class:`RequestRecord` per model request. A generation task makes one request per sample; a multiple-choice task
makes one loglikelihood request per option, so the pipeline sums the records of a sample (:func:`sum_records`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestRecord:
    """What one request cost.

    Attributes:
        task: lmms-eval task name; ``doc_id``: the sample's index in the task split.
        request_type: ``"generate_until"`` or ``"loglikelihood"``.
        layer: the withdrawal layer ``K`` in force (``None``: no withdrawal).
        vision_tokens: vision (image/video placeholder) tokens of the prompt.
        text_tokens: the other, non-padding prompt tokens (for loglikelihood: context + continuation).
        generated_tokens: tokens produced by decoding (0 for loglikelihood), up to and including the stop token.
        images: images and videos of the request.
        latency_s: this request's share of its batch's model-call wall time (batch time / batch size); processing
            inputs (image preprocessing, tokenization) is excluded.
        batch_size: size of the batch the request ran in.
        flops: FLOPs of this request under ``layer`` (counted convention: every executed matmul + attention,
            one multiply-add = 2 FLOPs, no padding, see :func:`vtw.flops.count_flops`).
        flops_full: the same request with no withdrawal (``K = L``).
        flops_expected: the FLOPs the method's declared counts give (:meth:`vtw.methods.Reduction.layer_tokens`);
            ``flops`` follows the tokens each layer really processed (the handle's realized counts), so the two
            differ only for methods whose counts depend on the data. ``None``: not recorded (read as ``flops``).
        paper_flops / paper_flops_full: the VTW/FastV paper convention (:func:`vtw.flops.paper_flops`), at
            ``layer`` and at ``K = L``.
        first_token_id: generation: the id the first generated token's distribution ranks first (``None`` for
            loglikelihood). first_token_agree / first_token_kl: against the full model's first-token distribution
            on the same sample, when the model holds one (:attr:`vtw.lmms.model.VTWModel.first_token_reference`):
            top-1 equal, and ``KL(P_full || P)`` in nats; else ``None``.
    """

    task: str
    doc_id: int
    request_type: str
    layer: int | None
    vision_tokens: int
    text_tokens: int
    generated_tokens: int
    images: int
    latency_s: float
    batch_size: int
    flops: float
    flops_full: float
    paper_flops: float
    paper_flops_full: float
    first_token_id: int | None = None
    first_token_agree: bool | None = None
    first_token_kl: float | None = None
    flops_expected: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleCost:
    """The summed cost of one sample (all its requests). Same fields as :class:`RequestRecord` where summable."""

    task: str
    doc_id: int
    requests: int
    vision_tokens: int
    text_tokens: int
    generated_tokens: int
    latency_s: float
    flops: float
    flops_full: float
    paper_flops: float
    paper_flops_full: float
    first_token_id: int | None = None  # of the sample's generate request (see RequestRecord)
    first_token_agree: bool | None = None
    first_token_kl: float | None = None
    flops_expected: float = 0.0  # see RequestRecord

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tflops"] = self.tflops
        d["tflops_full"] = self.flops_full / 1e12
        d["paper_tflops"] = self.paper_flops / 1e12
        d["paper_tflops_full"] = self.paper_flops_full / 1e12
        return d


_SUMMED = ("vision_tokens", "text_tokens", "generated_tokens", "latency_s", "flops", "flops_full")
_SUMMED += ("paper_flops", "paper_flops_full")
_FIRST = ("first_token_id", "first_token_agree", "first_token_kl")


def sum_records(records: Iterable[RequestRecord]) -> dict[tuple[str, int], SampleCost]:
    """Sum the records of each ``(task, doc_id)``; the result is keyed and ordered by first appearance."""
    out: dict[tuple[str, int], dict] = {}
    for r in records:
        key = (r.task, int(r.doc_id))
        acc = out.get(key)
        if acc is None:
            out[key] = acc = {"task": r.task, "doc_id": int(r.doc_id), "requests": 0, **dict.fromkeys(_SUMMED, 0)}
        acc["requests"] += 1
        for name in _SUMMED:
            acc[name] += getattr(r, name)
        acc["flops_expected"] = acc.get("flops_expected", 0) + (
            r.flops if r.flops_expected is None else r.flops_expected
        )
        for name in _FIRST:
            if getattr(r, name) is not None:
                acc[name] = getattr(r, name)
    return {k: SampleCost(**v) for k, v in out.items()}
