"""Loyalty: how often a reduced model answers as the full model does, on the same samples.

Per sample (matched by task and document id) against the full model's row:

* ``agree``: the same answer: the same filtered response for generation tasks, the same chosen option (the lowest
  loglikelihood loss of the options) for multiple choice;
* for generation tasks, the first generated token's distribution: top-1 agreement (from the ids each row records)
  and ``KL(P_full || P)`` (nats), which needs both distributions in one process: it is measured when a job evaluates
  the baseline too (lone runs, ``compare_baseline``) and left empty in sweeps.

:func:`loyalty` averages them for one variant; a job computes it against its own baseline, and a sweep's summary
against the sweep's baseline job (``vtw.layer=null``) from the jobs' ``samples.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

FIELDS = ("loyalty", "first_token_agreement", "first_token_kl")


def answer(response):
    """What a sample answered: the text (stripped) for generation, the index of the chosen option for multiple choice
    (lmms-eval's loglikelihood responses: one ``[loss, is_greedy]`` per option, the lowest loss chosen)."""
    if isinstance(response, str):
        return response.strip()
    if isinstance(response, list) and response and all(isinstance(r, list) and len(r) == 2 for r in response):
        losses = [float(r[0]) for r in response]
        return losses.index(min(losses))
    return json.dumps(response, sort_keys=True)


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def loyalty(rows: Iterable[dict], reference: Iterable[dict]) -> dict:
    """``{"loyalty", "first_token_agreement", "first_token_kl", "loyalty_samples"}`` of ``rows`` (one variant's
    sample rows) against ``reference`` (the full model's rows); samples without a reference row are left out.
    ``None`` where nothing could be compared."""
    ref = {(r["task"], int(r["doc_id"])): r for r in reference}
    agree, top1, kl = [], [], []
    for r in rows:
        base = ref.get((r["task"], int(r["doc_id"])))
        if base is None:
            continue
        agree.append(answer(r.get("response")) == answer(base.get("response")))
        if r.get("first_token_id") is not None and base.get("first_token_id") is not None:
            top1.append(r["first_token_id"] == base["first_token_id"])
        if r.get("first_token_kl") is not None:
            kl.append(float(r["first_token_kl"]))
    return {
        "loyalty": _mean([float(a) for a in agree]),
        "first_token_agreement": _mean([float(a) for a in top1]),
        "first_token_kl": _mean(kl),
        "loyalty_samples": len(agree),
    }
