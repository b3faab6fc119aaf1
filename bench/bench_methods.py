"""Benchmark of the peer methods at matched compute on the LLaVA-1.5-shaped tiny model of bench_withdraw.py (CPU).

Every method is set to the same budget (``--budget``, default 0.5 of the full model's exact prefill FLOPs, matched by
:func:`vtw.flops.budget.match_budget` on the benchmark prompt), and timed in one round-robin with the untouched
model, so that machine noise hits all alike. Printed, from one run:

* prefill time, its speedup over the untouched model, the analytic FLOPs speedup, and realized / analytic (target
  >= 0.9);
* the methods acting before the decoder (``pool``, ``visionzip``) at the same budget;
* the scoring overhead of FastV and PyramidDrop as a share of their prefill time (target <= 3 %): each is timed
  again with a "replay" of the very tokens it kept (the same stages and packing, no scoring), and the difference is
  the scoring.

    python bench/bench_methods.py [--layers 16 --hidden 512 --reps 7 --budget 0.5]

On a GPU, a shipped checkpoint's shapes, random-initialised on the device (bench_withdraw.py's ``--config``), with
peak GPU memory per method:

    python bench/bench_methods.py --config llava-1.5-7b
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from bench_withdraw import describe, inputs_for, load, model_options, sync

from vtw import get_family, withdraw
from vtw.flops import count_flops
from vtw.flops.budget import Prompt, match_budget
from vtw.methods import FastV, Pool, PyramidDrop, RandomVision, Reduction, StageContext, VisionZip, Withdrawal


@dataclass(frozen=True)
class Replay(Reduction):
    """Keeps, stage by stage, the masks recorded from another method's run: its packing without its scoring."""

    name = "replay"
    of: Reduction | None = None
    masks: list = field(default_factory=list, compare=False)

    def resolve(self, num_layers):
        return self

    def stages(self):
        return self.of.stages()

    def select(self, ctx: StageContext):
        return self.masks[ctx.stage]

    def stage_tokens(self, stage, vision, text):
        return self.of.stage_tokens(stage, vision, text)


@dataclass(frozen=True)
class Recorder(Reduction):
    """Runs ``of`` and records the masks it returns."""

    name = "recorder"
    of: Reduction | None = None
    masks: list = field(default_factory=list, compare=False)
    uses_previous_layer = True

    def resolve(self, num_layers):
        return self

    def stages(self):
        return self.of.stages()

    def select(self, ctx: StageContext):
        keep = self.of.select(ctx)
        self.masks.append(keep.clone())
        return keep


@torch.no_grad()
def prefill(model, inputs) -> float:
    device = inputs["input_ids"].device
    sync(device)
    t0 = time.perf_counter()
    model(**inputs, use_cache=True, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = model_options(__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=0.5)
    args = p.parse_args()
    model, device, dtype = load(args)
    inputs = inputs_for(model, args.text_tokens)
    image_id = get_family(model.config).vision_token_ids(model.config)[0]
    cfg, n_vision, n_text = model.config, int((inputs["input_ids"] == image_id).sum()), args.text_tokens
    prompt = [Prompt(n_vision, n_text, {"vision_inputs": 1})]
    methods = {}
    peers = (FastV(layer=2), PyramidDrop(), RandomVision(layer=2), Pool(), VisionZip())
    for m in (Withdrawal(layer=args.layers // 2), *peers):
        match = match_budget(cfg, prompt, m, args.budget)
        methods[match.method.name] = (match.method, match.ratio)
    replays = {}
    for name in ("fastv", "pdrop"):
        rec = Recorder(of=methods[name][0])
        with withdraw(model, method=rec):
            prefill(model, inputs)
        replays[name] = Replay(of=methods[name][0], masks=rec.masks)
    runs = {"vanilla": None} | {n: m for n, (m, _) in methods.items()} | {f"{n} replay": r for n, r in replays.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    peak: dict[str, float] = {}
    prefill(model, inputs)  # warm-up
    for _ in range(args.reps):
        for name, method in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if method is None:
                times[name].append(prefill(model, inputs))
            else:
                with withdraw(model, method=method):
                    times[name].append(prefill(model, inputs))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    med = {name: statistics.median(t) for name, t in times.items()}
    full = count_flops(cfg, vision_tokens=n_vision, text_tokens=n_text, generated_tokens=1).prefill.total
    print(f"{describe(args, device, dtype, n_vision)}, budget {args.budget:g} of the full prefill FLOPs, medians of "
          f"{args.reps} round-robin reps")  # fmt: skip

    def mem(name):
        return f"{peak[name]:>10.2f}" if peak else ""

    print(f"{'method':<44}{'FLOPs share':>12}{'prefill ms':>12}{'speedup':>9}{'analytic':>10}{'real/an.':>10}"
          + (f"{'peak GiB':>10}" if peak else ""))  # fmt: skip
    print(
        f"{'vanilla':<44}{1.0:>12.3f}{med['vanilla'] * 1e3:>12.1f}{1.0:>9.2f}{1.0:>10.2f}{1.0:>10.2f}{mem('vanilla')}"
    )
    for name, (method, _) in methods.items():
        rep = count_flops(cfg, vision_tokens=n_vision, text_tokens=n_text, generated_tokens=1, method=method)
        analytic = full / rep.prefill.total
        real = med["vanilla"] / med[name]
        print(
            f"{method.label:<44}{rep.prefill.total / full:>12.3f}{med[name] * 1e3:>12.1f}{real:>9.2f}"
            f"{analytic:>10.2f}{real / analytic:>10.2f}{mem(name)}"
        )
    for name in replays:
        overhead = (med[name] - med[f"{name} replay"]) / med[name]
        rep = count_flops(cfg, vision_tokens=n_vision, text_tokens=n_text, generated_tokens=1, method=methods[name][0])
        print(
            f"{name} scoring overhead: {overhead * 100:+.2f}% of its prefill time (analytic "
            f"{rep.prefill.reduction / rep.prefill.total * 100:.2f}% of its FLOPs); target <= 3%"
        )


if __name__ == "__main__":
    main()
