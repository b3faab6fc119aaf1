"""Batch planning for lmms-eval requests: group compatible requests, sort by length, chunk.

All requests of all tasks arrive in one call. Requests may only share a batch when they belong to the same task
and (for generation) the same generation settings; within a group the longest come first so memory problems show up
at once and batches hold similar lengths (less padding).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence


def plan_batches(keys: Sequence[Hashable], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the requests of each batch.

    Args:
        keys: per request, the group it belongs to (requests with equal keys may share a batch).
        lengths: per request, a length used for sorting (longest first, ties in input order).
        batch_size: maximum requests per batch (>= 1).

    Returns:
        A list of batches, each a list of request indices; every index appears exactly once. Groups come in order
        of first appearance.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(keys) != len(lengths):
        raise ValueError(f"keys ({len(keys)}) and lengths ({len(lengths)}) differ in length")
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    batches: list[list[int]] = []
    for members in groups.values():
        members = sorted(members, key=lambda i: -lengths[i])  # stable: ties keep input order
        batches.extend(members[s : s + batch_size] for s in range(0, len(members), batch_size))
    return batches


def gen_kwargs_key(gen_kwargs: dict | None) -> str:
    """A hashable, order-independent key of a generation-kwargs dict (values that are not JSON become strings)."""
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)
