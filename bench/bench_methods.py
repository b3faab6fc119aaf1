"""Benchmark of every registered method at matched compute on the LLaVA-1.5-shaped tiny model of bench_withdraw.py (CPU).

Every method of :data:`vtw.methods.METHODS` (the registry, so a new method file is benchmarked without an edit here)
is set to the same budget (``--budget``, default 0.5 of the full model's exact prefill FLOPs, matched by
:func:`vtw.flops.budget.match_budget` on the benchmark prompt), and timed in one round-robin with the untouched
model, so that machine noise hits all alike. A method that cannot act on the benchmark's model is listed as skipped
with its one-line refusal; one without a free parameter (no ``budget_candidates``) runs at its defaults and is listed
as not budget-matched. Printed, from one run:

* prefill time, its speedup over the untouched model, the analytic FLOPs speedup, and realized / analytic (target
  >= 0.9);
* each method's scoring time: the wall time of its own ``select`` (the attention scoring, the ranking, their host
  syncs), accumulated inside those same prefills by a timer put on the method instance the withdrawal handle asks
  (synchronised on GPU; neither the method's class nor the caller's object is changed); its share of the prefill it
  ran in, per rep: the median and [min-max] over the reps, and the spread in percentage points, as the
  interquartile range (robust) and max - min (which one burst of another process widens, more so with more reps),
  next to the analytic share of the FLOPs; and PASS/FAIL of the median share against the target (FastV and
  PyramidDrop <= 3 %, SparseVLM <= 5 %; the other methods have none). On a quiet 2-core CPU the defaults give
  FastV's and PDrop's share to within 0.2 pp (IQR and range).

    python bench/bench_methods.py [--layers 16 --hidden 512 --reps 7 --budget 0.5]
    python bench/bench_methods.py --video 8      # a Video-LLaVA-shaped model, one 8-frame video (DyCoke acts)

On a GPU, a shipped checkpoint's shapes, random-initialised on the device (bench_withdraw.py's ``--config``), with
peak GPU memory per method:

    python bench/bench_methods.py --config llava-1.5-7b
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from bench_withdraw import describe, inputs_for, load, load_video, model_options, sync, video_inputs_for

from vtw import get_family, withdraw
from vtw.flops import SampleCounts, count_flops
from vtw.flops.budget import match_budget
from vtw.methods import METHODS, Reduction, StageContext

#: the scoring share of the prefill each method must stay within (methods not named here have no target)
TARGETS = {"fastv": 0.03, "pdrop": 0.03, "sparsevlm": 0.05}


class SelectTimer:
    """A method's ``select`` that adds its own wall time to :attr:`seconds` and counts its :attr:`calls`. On GPU the
    device is synchronised before (so the layers queued before the stage are not counted) and after (so its queued
    work is)."""

    def __init__(self, select, device: torch.device):
        self.select, self.device = select, device
        self.seconds, self.calls = 0.0, 0

    def __call__(self, ctx: StageContext):
        sync(self.device)
        t0 = time.perf_counter()
        picked = self.select(ctx)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return picked

    def also(self, fn):
        """``fn`` whose wall time is added to :attr:`seconds` as well (a method's work outside ``select``)."""

        def timed(*args):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args)
            sync(self.device)
            self.seconds += time.perf_counter() - t0
            return out

        return timed


@contextmanager
def timed_withdraw(model, method: Reduction, device: torch.device) -> Iterator[SelectTimer]:
    """``withdraw(model, method=method)`` whose handle asks, at each stage, a copy of its resolved method with a
    :class:`SelectTimer` in place of that copy's ``select``; yields the timer."""
    with withdraw(model, method=method) as handle:
        timed = copy.copy(handle.method)
        timer = SelectTimer(timed.select, device)
        object.__setattr__(timed, "select", timer)  # on this instance only (a frozen dataclass)
        if hasattr(timed, "decide"):  # a method acting in the vision encoder decides at the projector: timed too
            object.__setattr__(timed, "decide", timer.also(timed.decide))
        handle.method = timed
        yield timer


@torch.no_grad()
def prefill(model, inputs) -> float:
    """Seconds of one prefill of ``inputs`` (the first generated token's logits only), synchronised on GPU."""
    device = inputs["input_ids"].device
    sync(device)
    t0 = time.perf_counter()
    model(**inputs, use_cache=True, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Setup:
    """The methods to time: ``runs`` (registry name -> the method, matched to the budget unless its name is in
    ``unmatched``) and ``skipped`` (registry name -> its refusal on this model)."""

    runs: dict[str, Reduction]
    unmatched: list[str]
    skipped: dict[str, str]


def setup_methods(model, prompt: list[SampleCounts], budget: float, registry: dict[str, type[Reduction]]) -> Setup:
    """Each method of ``registry`` at its defaults, matched to ``budget`` where it has a free parameter; a method
    whose construction, matching or installation on ``model`` raises ``ValueError`` is skipped with that message, and
    one that would install nothing on ``model`` is skipped as such."""
    cfg, num_layers = model.config, model.config.get_text_config().num_hidden_layers
    out = Setup({}, [], {})
    for name, cls in registry.items():
        try:
            method = cls()
            if method.budget_candidates(num_layers):
                method = match_budget(cfg, prompt, method, budget).method
            else:
                out.unmatched.append(name)
            with withdraw(model, method=method) as handle:
                active = handle.active
        except ValueError as e:
            out.skipped[name] = str(e).splitlines()[0]
            continue
        if not active:
            out.skipped[name] = f"{method.label} installs nothing on this model"
            continue
        out.runs[name] = method
    return out


def measure(model, inputs, runs: dict[str, Reduction], reps: int, device: torch.device):
    """``reps`` round-robin prefills of the untouched model (``"vanilla"``) and every method. Returns ``(times,
    scoring, peak)``: prefill seconds per rep, each method's ``select`` seconds in the same prefills, and peak GPU
    GiB (empty on CPU)."""
    times: dict[str, list[float]] = {name: [] for name in ("vanilla", *runs)}
    scoring: dict[str, list[float]] = {name: [] for name in runs}
    peak: dict[str, float] = {}
    prefill(model, inputs)  # warm-up: the model, then each method once
    for method in runs.values():
        with withdraw(model, method=method):
            prefill(model, inputs)
    for _ in range(reps):
        for name in times:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if name == "vanilla":
                times[name].append(prefill(model, inputs))
            else:
                with timed_withdraw(model, runs[name], device) as timer:
                    times[name].append(prefill(model, inputs))
                scoring[name].append(timer.seconds)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    return times, scoring, peak


def print_speedups(setup: Setup, flops: dict, times: dict, peak: dict) -> None:
    """The speedup table: FLOPs share, prefill ms, realized and analytic speedups and their ratio, peak GiB."""
    med = {name: statistics.median(t) for name, t in times.items()}
    full = flops["vanilla"].prefill.total
    width = max([len(m.label) + 2 for m in setup.runs.values()] + [44])
    print(f"{'name':<15}{'method':<{width}}{'FLOPs share':>12}{'prefill ms':>12}{'speedup':>9}{'analytic':>10}"
          f"{'real/an.':>10}" + (f"{'peak GiB':>10}" if peak else ""))  # fmt: skip
    for name in med:
        label = setup.runs[name].label if name in setup.runs else ""
        analytic = full / flops[name].prefill.total
        real = med["vanilla"] / med[name]
        mem = f"{peak[name]:>10.2f}" if peak else ""
        print(f"{name:<15}{label:<{width}}{1 / analytic:>12.3f}{med[name] * 1e3:>12.1f}{real:>9.2f}{analytic:>10.2f}"
              f"{real / analytic:>10.2f}{mem}")  # fmt: skip
    for name in setup.unmatched:
        print(f"not budget-matched: {name} (no budget_candidates; run at its defaults)")
    for name, why in setup.skipped.items():
        print(f"skipped: {name}: {why}")


def spread(values: list[float]) -> tuple[float, float, float, float]:
    """``(median, min, max, interquartile range)`` of ``values`` (IQR 0 for one value)."""
    if len(values) < 2:
        return values[0], values[0], values[0], 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), min(values), max(values), q3 - q1


def print_scoring(setup: Setup, flops: dict, times: dict, scoring: dict) -> None:
    """The scoring table: per method, its ``select`` ms and its share of the prefill it ran in, per rep: median
    [min-max], and the share's spread (IQR and max - min, percentage points); the analytic FLOPs share of the
    scoring; PASS/FAIL of the median share against the method's target."""
    print("scoring: each method's own select (scores, ranking, host syncs), timed inside the same prefills; "
          "share = select time / time of the prefill it ran in; median [min-max] over the reps")  # fmt: skip
    print(f"{'name':<15}{'scoring ms':>22}{'prefill ms':>12}{'share %':>20}{'IQR pp':>8}{'range pp':>10}"
          f"{'FLOPs %':>9}{'target':>8}  result")  # fmt: skip
    for name in setup.runs:
        ms, lo, hi, _ = spread([s * 1e3 for s in scoring[name]])
        share, s_lo, s_hi, iqr = spread([s / t * 100 for s, t in zip(scoring[name], times[name])])
        rep, target = flops[name].prefill, TARGETS.get(name)
        goal = "-" if target is None else f"<={target * 100:g}%"
        verdict = "-" if target is None else ("PASS" if share <= target * 100 else "FAIL")
        print(f"{name:<15}{f'{ms:.2f} [{lo:.2f}-{hi:.2f}]':>22}{statistics.median(times[name]) * 1e3:>12.1f}"
              f"{f'{share:.2f} [{s_lo:.2f}-{s_hi:.2f}]':>20}{iqr:>8.2f}{s_hi - s_lo:>10.2f}"
              f"{rep.reduction / rep.total * 100:>9.2f}{goal:>8}  {verdict}")  # fmt: skip


@torch.no_grad()
def realized_tokens(model, inputs: dict, method: Reduction | None) -> list | None:
    """The ``(vision, text)`` tokens each decoder layer really processes in the benchmark prompt's prefill under
    ``method`` (``handle.last_layer_tokens``; ``None``: the untouched model or nothing installed), so the analytic
    speedup of a method whose counts depend on the data (SparseVLM, PruMerge) is that of what it kept."""
    if method is None:
        return None
    with withdraw(model, method=method) as handle:
        if not handle.active:
            return None
        model(**inputs, use_cache=True)
        return handle.last_layer_tokens[0].tolist()


def bench_prompt(args):
    """``(model, device, dtype, inputs, prompt)``: the benchmark model and its one prompt (an image; with ``--video N``
    a Video-LLaVA-shaped model and one video of ``N`` frames), and that prompt's :class:`~vtw.flops.SampleCounts`."""
    if args.video:
        if args.config:
            raise SystemExit("--video builds its own Video-LLaVA-shaped model; give no --config")
        model, device, dtype = load_video(args)
        inputs = video_inputs_for(model, args.text_tokens, args.video)
        n_vision = int((inputs["input_ids"] == model.config.video_token_id).sum())
        return model, device, dtype, inputs, SampleCounts(n_vision, args.text_tokens, video_frames=args.video)
    model, device, dtype = load(args)
    inputs = inputs_for(model, args.text_tokens)
    image_id = get_family(model.config).vision_token_ids(model.config)[0]
    n_vision = int((inputs["input_ids"] == image_id).sum())
    return model, device, dtype, inputs, SampleCounts(n_vision, args.text_tokens, vision_inputs=1)


def main(argv: list[str] | None = None, registry: dict[str, type[Reduction]] | None = None) -> None:
    """Run the benchmark (``argv``: its command line; ``registry``: the methods, :data:`vtw.methods.METHODS`)."""
    p = model_options(__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument(
        "--video", type=int, default=0, help="> 0: a Video-LLaVA-shaped model, one video of that many frames"
    )
    args = p.parse_args(argv)
    model, device, dtype, inputs, prompt = bench_prompt(args)
    cfg, n_vision = model.config, prompt.vision_tokens
    setup = setup_methods(model, [prompt], args.budget, METHODS if registry is None else registry)
    flops = {
        name: count_flops(
            cfg, replace(prompt, generated_tokens=1), method, layer_tokens=realized_tokens(model, inputs, method)
        )
        for name, method in {"vanilla": None, **setup.runs}.items()
    }
    times, scoring, peak = measure(model, inputs, setup.runs, args.reps, device)
    print(f"{describe(args, device, dtype, n_vision)}, budget {args.budget:g} of the full prefill FLOPs, medians of "
          f"{args.reps} round-robin reps")  # fmt: skip
    print_speedups(setup, flops, times, peak)
    print_scoring(setup, flops, times, scoring)


if __name__ == "__main__":
    main()
