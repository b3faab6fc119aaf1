"""``vtw.budget``: match a method's free parameter to a share of the full model's exact TFLOPs on the task's prompts.

The prompts are the first ``vtw.budget_limit`` documents of each task, prepared exactly as the evaluation prepares
them (the model's processor and chat template; :func:`vtw.pipeline.layer_search.task_samples`); only their token
counts and encoder workloads are used (no forward). The matching itself is :func:`vtw.flops.budget.match_budget`.
"""

from __future__ import annotations

import logging

from ..flops.budget import BudgetMatch, match_budget
from ..methods import Reduction
from .schema import Config

log = logging.getLogger("vtw")


def match_job_budget(spec: Config, lm, task_manager, method: Reduction) -> BudgetMatch:
    """The setting of ``method`` closest to ``spec.vtw.budget`` on the job's prompts (see the module docstring)."""
    from .layer_search import task_samples

    prompts = [lm.meter.prompt(x) for x in task_samples(lm, task_manager, spec.dataset.tasks, spec.vtw.budget_limit)]
    match = match_budget(lm.config, prompts, method, spec.vtw.budget)
    log.info(
        "budget %.3g of the full TFLOPs: %s (%s chosen) reaches %.3f on %d prompts",
        match.budget,
        match.method.label,
        type(match.method).free_parameter,
        match.ratio,
        match.prompts,
    )
    return match
