"""``vtw.method=auto``: which reduction method keeps a model's answers at a given compute, on a few prompts.

Each candidate method is set to the budget (its free parameter matched to ``F`` times the full model's exact prefill
FLOPs on these prompts, :func:`vtw.flops.budget.match_budget`), run once per prompt (greedy, ``max_new_tokens``), and
compared with the full model's run on the same prompt, which is computed once and shared by every candidate:

* ``kl``: ``KL(P_full || P_method)`` of the first generated token's distribution (nats);
* ``top1``: whether the first generated token is the same;
* ``agree``: whether the whole short greedy answer is the same (its token ids up to the end of sequence): loyalty.

Each is averaged over the prompts with a 95% interval (Wilson's score interval for the two agreements, the normal
interval of the mean for the KL). **The rule**: among the candidates that reach the budget (their matched share of the
full prefill FLOPs at most ``budget +`` :data:`TOLERANCE`; a method whose settings cannot go that low, such as one
acting at a late layer, is *over budget* and wins only where every candidate is), the highest answer agreement;
between equal agreements the lower mean KL, then the higher top-1 agreement, then the earlier candidate. Cost: one prefill of the full model and one of each
candidate per prompt, plus their decode steps (:attr:`Choice.cost`).

Only torch, transformers and the FLOPs model are used here; the calibration prompts, the cache, the outputs and the
logs live in :mod:`vtw.pipeline.choose`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .flops import SampleCounts, count_flops
from .flops.budget import match_budget, prompt_flops
from .methods import Reduction
from .withdraw import withdraw

#: z of a two-sided 95% interval
Z95 = 1.959964
#: how far above the budget a candidate's matched share may be and still count as reaching it
TOLERANCE = 0.05


@dataclass(frozen=True)
class Run:
    """One prompt's greedy run: the first token's log-probabilities ``(V,)`` float32, the answer's token ids (up to
    the end of sequence), the tokens generated (the end of sequence included), and the realized ``(vision, text)``
    tokens of each decoder layer (``None``: the full model)."""

    logprobs: torch.Tensor
    answer: tuple[int, ...]
    generated: int
    layer_tokens: list | None = None


@dataclass
class Score:
    """One candidate at the budget: its setting, the share of the full prefill FLOPs it was matched to, and its
    agreement with the full model (means and 95% intervals over the prompts)."""

    name: str
    label: str
    params: dict
    budget_ratio: float
    agree: float
    agree_ci: tuple[float, float]
    top1: float
    top1_ci: tuple[float, float]
    kl: float
    kl_ci: tuple[float, float]
    prompts: int
    flops_share: float  # realized prefill + decode FLOPs of its runs over the full model's runs
    over_budget: bool = False  # its matched share exceeds the budget by more than TOLERANCE

    def key(self) -> tuple:
        """The rule's order (smaller first): within the budget, the highest agreement, the lowest KL, the highest
        top-1."""
        return (self.over_budget, -self.agree, self.kl, -self.top1)


@dataclass
class Choice:
    """The outcome: the ``chosen`` candidate's name (``None``: no candidate), the ``scores`` of every candidate (in
    the order given), the budget and what the choice cost (``cost``: prefills per prompt, the full model's included,
    in units of one full prefill; and the same for the equivalent sweep of lone runs)."""

    budget: float
    chosen: str | None
    scores: list[Score]
    prompts: int
    rule: str = (
        f"within the budget (+{TOLERANCE:g}): highest answer agreement, then lowest first-token KL, then highest "
        "top-1 agreement"
    )
    cost: dict = field(default_factory=dict)

    def score(self, name: str) -> Score:
        return next(s for s in self.scores if s.name == name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Choice:
        scores = [Score(**{**s, **{k: tuple(s[k]) for k in ("agree_ci", "top1_ci", "kl_ci")}}) for s in d["scores"]]
        return cls(**{**d, "scores": scores})


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion ``successes / n`` (``(0, 1)`` for ``n = 0``)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """The mean of ``values`` and its normal 95% interval (sample standard deviation; a point for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, (mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


@torch.no_grad()
def greedy_run(
    model: nn.Module, inputs: dict, max_new_tokens: int, method: Reduction | None = None, positions: str = "keep"
) -> Run:
    """``model``'s greedy answer to one prompt (``inputs``: a batch of one), under ``method`` (``None``: as it is;
    ``positions``: :data:`vtw.withdraw.POSITIONS`)."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"a calibration prompt is a batch of one, got {inputs['input_ids'].shape[0]}")
    handle = None if method is None else withdraw(model, method=method, positions=positions)
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
    new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    tokens = None if handle is None or handle.last_layer_tokens is None else handle.last_layer_tokens[0].tolist()
    return Run(torch.log_softmax(out.logits[0][0].float(), -1).cpu(), tuple(new[:end]), len(new), tokens)


def compare(reference: Run, run: Run) -> tuple[float, bool, bool]:
    """``(KL(P_full || P), same first token, same answer)`` of one prompt."""
    p = reference.logprobs.exp()
    kl = float((p * (reference.logprobs - run.logprobs)).sum().clamp(min=0))
    return kl, int(reference.logprobs.argmax()) == int(run.logprobs.argmax()), reference.answer == run.answer


def choose_method(
    model: nn.Module,
    samples: Sequence[dict],
    prompts: Sequence[SampleCounts],
    candidates: Sequence[Reduction],
    budget: float,
    max_new_tokens: int = 8,
    positions: str = "keep",
) -> Choice:
    """Set every candidate to ``budget`` on ``prompts`` (the counts of ``samples``, :class:`vtw.flops.SampleCounts`),
    run it on ``samples`` (model inputs, a batch of one each; ``positions`` as ``withdraw``'s) and choose by the rule
    of the module docstring.

    Raises:
        ValueError: no sample, counts that do not match the samples, no candidate, a candidate without a free
            parameter (before any forward).
    """
    if not samples:
        raise ValueError("the choice got no calibration prompts: give at least one")
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompt counts for {len(samples)} calibration prompts")
    if not candidates:
        raise ValueError("the choice got no candidate method")
    config = model.config
    matched = [match_budget(config, prompts, m, budget) for m in candidates]  # raises before any forward
    reference = [greedy_run(model, s, max_new_tokens) for s in samples]
    full = [_run_flops(config, p, r, None) for p, r in zip(prompts, reference)]
    full_prefill = prompt_flops(config, prompts, None)
    scores = []
    for match in matched:
        runs = [greedy_run(model, s, max_new_tokens, match.method, positions) for s in samples]
        scores.append(_score(match, reference, runs, [_run_flops(config, p, r, match.method)
                                                       for p, r in zip(prompts, runs)], sum(full)))  # fmt: skip
    best = pick(scores)
    cost = {
        "prefills_per_prompt": 1 + sum(m.ratio for m in matched),
        "flops_per_prompt_in_full_prefills": (sum(full) + sum(s.flops_share * sum(full) for s in scores))
        / full_prefill,
        "lone_runs_prefills_per_prompt": sum(1 + m.ratio for m in matched),
        "bound": 1.5 * (1 + sum(m.ratio for m in matched)),
    }
    return Choice(budget=budget, chosen=scores[best].name, scores=scores, prompts=len(samples), cost=cost)


def pick(scores: Sequence[Score]) -> int:
    """The index of the best of ``scores`` by the rule (:meth:`Score.key`; ties: the earlier)."""
    return min(range(len(scores)), key=lambda i: (*scores[i].key(), i))


def _run_flops(config, prompt: SampleCounts, run: Run, method: Reduction | None) -> int:
    """Exact FLOPs of one greedy run (prefill and decode steps, from the realized counts)."""
    sample = replace(prompt, generated_tokens=run.generated)
    return count_flops(config, sample, method, layer_tokens=run.layer_tokens).total


def _score(match, reference: list[Run], runs: list[Run], flops: list[int], full_flops: int) -> Score:
    kl, top1, agree = zip(*(compare(r, x) for r, x in zip(reference, runs)))
    n = len(runs)
    kl_mean, (kl_lo, kl_hi) = mean_ci(kl)
    kl_ci = (max(0.0, kl_lo), kl_hi)  # a divergence is never negative
    return Score(
        name=match.method.name,
        label=match.method.label,
        params=match.method.params(),
        budget_ratio=match.ratio,
        agree=sum(agree) / n,
        agree_ci=wilson(sum(agree), n),
        top1=sum(top1) / n,
        top1_ci=wilson(sum(top1), n),
        kl=kl_mean,
        kl_ci=kl_ci,
        prompts=n,
        flops_share=sum(flops) / full_flops,
        over_budget=match.ratio > match.budget + TOLERANCE,
    )
