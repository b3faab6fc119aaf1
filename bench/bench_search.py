"""Benchmark of the KL layer search: its cost as a multiple of one vanilla prefill per sample, next to the naive search
(one full forward with withdrawal per candidate layer, as the reference implementation does). Same model, samples and
candidates; both searches must choose the same K with the same KL curve.

    python bench/bench_search.py [--layers 32 --hidden 256 --samples 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_withdraw import build, inputs_for

from vtw import withdraw
from vtw.search import SearchSettings, divergence, search_layer


@torch.no_grad()
def naive_search(model, samples, settings: SearchSettings, num_layers: int) -> dict[int, float]:
    candidates = range(settings.min_layer, num_layers)
    per_k = {k: [] for k in candidates}
    for inputs in samples:
        full = model(**inputs, logits_to_keep=1).logits[:, -1]
        for k in candidates:
            with withdraw(model, k):
                part = model(**inputs, logits_to_keep=1).logits[:, -1]
            per_k[k].append(float(divergence(part, full)[0]))
    return {k: sum(v) / len(v) for k, v in per_k.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=60)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    samples = []
    for i in range(args.samples):
        x = inputs_for(model, args.text_tokens)
        x["pixel_values"] = torch.rand(x["pixel_values"].shape, generator=torch.Generator().manual_seed(i))
        samples.append(x)
    settings = SearchSettings(eta=1e-3).validate(args.layers)
    with torch.no_grad():
        model(**samples[0], logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        for x in samples:
            model(**x, logits_to_keep=1)
        prefill = (time.perf_counter() - t0) / len(samples)
    t0 = time.perf_counter()
    ours = search_layer(model, samples, settings)
    t_ours = (time.perf_counter() - t0) / len(samples)
    t0 = time.perf_counter()
    naive = naive_search(model, samples, settings, args.layers)
    t_naive = (time.perf_counter() - t0) / len(samples)
    worst = max(abs(ours.kl[k] - naive[k]) / max(naive[k], 1e-12) for k in naive)
    print(
        f"LLaVA-1.5-shaped model: L={args.layers}, d={args.hidden}, 576 vision + {args.text_tokens} text tokens, "
        f"candidates {settings.min_layer}..{args.layers - 1}, {args.samples} samples, CPU threads={torch.get_num_threads()}"
    )
    print(f"one vanilla prefill per sample: {prefill * 1e3:.0f} ms")
    print(f"vtw search:   {t_ours * 1e3:8.0f} ms/sample = {t_ours / prefill:5.2f} x prefill (target <= 3x)")
    print(f"naive search: {t_naive * 1e3:8.0f} ms/sample = {t_naive / prefill:5.2f} x prefill")
    print(
        f"speedup over naive: {t_naive / t_ours:.1f}x; same KL curve (max relative difference {worst:.1e}); "
        f"chosen K: ours {ours.layer}, naive {next((k for k in naive if naive[k] <= settings.eta), None)}"
    )


if __name__ == "__main__":
    main()
