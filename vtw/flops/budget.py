"""Matched compute: the setting of a method whose exact TFLOPs come closest to a share of the full model's.

``vtw.budget=F`` (``0 < F <= 1``) asks every method for the same compute: the free parameter of each method (VTW and
the paper's ``random``: ``K``; FastV and random vision pruning: ``keep`` at their layer; PyramidDrop: a common scale of
its keep shares; :meth:`vtw.methods.Reduction.budget_candidates`) is set so that the exact FLOPs of the task's
prompts, summed over the given samples, are as close as possible to ``F`` times the full model's. The count is the
prefill (the first generated token included): the compute a method spends on a prompt, before the answer's length,
which the method does not set, adds its decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..arch import architecture
from ..methods import Reduction
from ..workload import SampleCounts
from .count import count_flops


@dataclass(frozen=True)
class BudgetMatch:
    """The chosen setting: ``method``, and the share of the full model's FLOPs it reaches on the prompts
    (``ratio``), the ``budget`` asked, and the number of prompts it was matched on."""

    method: Reduction
    budget: float
    ratio: float
    prompts: int

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "ratio": self.ratio,
            "prompts": self.prompts,
            "parameter": type(self.method).free_parameter,
            "method": self.method.label,
            "params": {k: v for k, v in self.method.params().items()},
        }


def check_budget(budget) -> float:
    """A number in ``(0, 1]``, else ``ValueError`` naming it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a number in (0, 1] (a share of the full model's TFLOPs), got {budget!r}")
    return float(budget)


def prompt_flops(config, prompts: Sequence[SampleCounts], method: Reduction | None) -> int:
    """Exact prefill FLOPs (one generated token) of ``prompts`` summed, under ``method`` (``None``: the full model)."""
    return sum(count_flops(config, replace(p, generated_tokens=1), method).total for p in prompts)


def match_budget(config, prompts: Sequence[SampleCounts], method: Reduction, budget: float) -> BudgetMatch:
    """The candidate of ``method`` whose FLOPs ratio to the full model is closest to ``budget`` (ties: the larger
    ratio, then the candidate with the most compute in :meth:`~vtw.methods.Reduction.budget_candidates`' order,
    so ``budget=1`` is the full model for every method).

    Raises:
        ValueError: a budget outside ``(0, 1]``, no prompts, or a method without a free parameter.
    """
    budget = check_budget(budget)
    if not prompts:
        raise ValueError("matching a budget needs at least one prompt")
    num_layers = architecture(config).decoder.num_layers
    candidates = method.resolve(num_layers).budget_candidates(num_layers)
    if not candidates:
        raise ValueError(f"method {method.name!r} has no free parameter to match a budget with")
    full = prompt_flops(config, prompts, None)
    best = None
    for cand in reversed(candidates):  # the most compute first: it wins ties (equal FLOPs, fewer stages run)
        ratio = prompt_flops(config, prompts, cand) / full
        key = (abs(ratio - budget), -ratio)
        if best is None or key < best[0]:
            best = (key, cand, ratio)
    _, chosen, ratio = best
    return BudgetMatch(method=chosen, budget=budget, ratio=ratio, prompts=len(prompts))
