"""Samples/s of the ``vtw`` lmms-eval model at ``layer=null`` vs lmms-eval's own ``llava_hf`` model, side by side.

Same local model, same local task, same lmms-eval ``simple_evaluate`` call; the ratio and both accuracies come from
one run. Two rates are printed per wrapper: *inference* (samples / seconds inside the model's ``generate_until``)
and *end to end* (samples / seconds of the whole ``simple_evaluate``, task loading and scoring included). Model
loading is outside both. ``llava_hf`` runs one request at a time (it refuses larger batches); ``vtw`` batches.

    python bench/bench_wrapper_vs_llava_hf.py                  # embedded tiny-llava on vtw_synthvqa (CPU)
    python bench/bench_wrapper_vs_llava_hf.py --limit 100 --batch-size 16 --reps 3
    python bench/bench_wrapper_vs_llava_hf.py --pretrained DIR --tasks NAME --include-path DIR --device cuda

Target: ratio >= 1.0x with equal accuracy. lmms-eval's ``llava_hf`` imports ``decord`` (``pip install decord``).
Only generation tasks are compared: lmms-eval 0.7.3 turns ``llava_hf``'s loglikelihood tuples into strings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "vtw" / "assets"


def _timed_generate(lm) -> list[float]:
    """Time ``lm.generate_until`` calls (an attribute on this instance only; the class is untouched)."""
    spent: list[float] = []
    inner = lm.generate_until

    def generate_until(requests):
        t0 = time.perf_counter()
        out = inner(requests)
        spent.append(time.perf_counter() - t0)
        return out

    lm.generate_until = generate_until
    return spent


def _evaluate(lm, tasks, tm, limit, out_dir):
    from lmms_eval.evaluator import simple_evaluate

    from vtw.pipeline.evaluate import flatten_metrics

    spent = _timed_generate(lm)
    t0 = time.perf_counter()
    res = simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=True, bootstrap_iters=0,
        cli_args=SimpleNamespace(output_path=str(out_dir), process_with_media=False), process_docs_parallel=1,
        verbosity="WARNING",
    )  # fmt: skip
    wall = time.perf_counter() - t0
    n = sum(len(v) for v in res["samples"].values())
    answers = {(t, s["doc_id"]): str(s["filtered_resps"]) for t, v in res["samples"].items() for s in v}
    return {"n": n, "infer_s": sum(spent), "wall_s": wall, "metrics": flatten_metrics(res), "answers": answers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default=str(ASSETS / "tiny-llava"), help="local model dir (LLaVA / -NeXT / -OV)")
    p.add_argument("--tasks", default="vtw_synthvqa", help="comma-separated generation task names")
    p.add_argument("--include-path", default=str(ASSETS / "tasks"), help="directory of local lmms-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the vtw wrapper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=1, help="repetitions; the fastest of each wrapper is reported")
    p.add_argument("--fixture", action="store_true", help="use the random tiny LLaVA and task of the test suite")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vtw-bench-"))
    try:
        return _bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(args, tmp: Path) -> int:
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from lmms_eval.tasks import TaskManager

    from vtw.lmms.model import VTWModel

    chat_template = None
    if args.fixture or not (Path(args.pretrained) / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from test_lmms_fixtures import CHAT_TEMPLATE, build_tiny_llava, build_tiny_tasks

        print("using the test fixtures (random tiny LLaVA, local task): accuracies are near 0 by construction")
        args.pretrained = str(build_tiny_llava(tmp / "model"))
        args.tasks = build_tiny_tasks(tmp / "tasks", n=48)["gen"]
        args.include_path = str(tmp / "tasks")
        chat_template = CHAT_TEMPLATE  # its tokenizer has none; llava_hf reads the tokenizer's
    tasks = args.tasks.split(",")
    tm = TaskManager(include_path=args.include_path, include_defaults=False)

    def make(which: str):
        if which == "vtw":
            return VTWModel(
                pretrained=args.pretrained,
                layer=None,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
                chat_template=chat_template,
                progress=False,
            )
        return LlavaHf(
            pretrained=args.pretrained,
            device=args.device,
            device_map=args.device,
            dtype=args.dtype,
            batch_size=1,
            chat_template=chat_template,
        )

    best: dict[str, dict] = {}
    for rep in range(args.reps):
        for which in ("llava_hf", "vtw") if rep % 2 == 0 else ("vtw", "llava_hf"):
            lm = make(which)
            r = _evaluate(lm, tasks, tm, args.limit, tmp / f"{which}{rep}")
            if which not in best or r["infer_s"] < best[which]["infer_s"]:
                best[which] = r
            del lm

    ours, theirs = best["vtw"], best["llava_hf"]
    print(
        f"\nmodel {args.pretrained}  tasks {tasks}  samples {ours['n']}  device {args.device}  "
        f"vtw batch {args.batch_size}, llava_hf batch 1, best of {args.reps}"
    )
    print(f"{'wrapper':<10} {'infer s':>9} {'samples/s':>10} {'e2e samples/s':>14}  metrics")
    for name, r in (("llava_hf", theirs), ("vtw", ours)):
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
        print(
            f"{name:<10} {r['infer_s']:>9.3f} {r['n'] / r['infer_s']:>10.2f} {r['n'] / r['wall_s']:>14.2f}  {metrics}"
        )
    ratio = theirs["infer_s"] / ours["infer_s"]
    ratio_e2e = theirs["wall_s"] / ours["wall_s"]
    same = ours["metrics"] == theirs["metrics"]
    agree = sum(ours["answers"][k] == theirs["answers"].get(k) for k in ours["answers"]) / max(1, len(ours["answers"]))
    print(f"\nratio vtw / llava_hf samples/s: {ratio:.2f}x inference, {ratio_e2e:.2f}x end to end")
    print(f"accuracy equal: {same}; identical answers: {100 * agree:.1f}%")
    ok = ratio >= 1.0 and same
    print(f"target >= 1.0x with equal accuracy: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
