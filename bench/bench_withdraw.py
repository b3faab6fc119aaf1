"""Benchmark of the VTW core on a LLaVA-1.5-shaped tiny model (CPU): measured speedups next to the analytic ones.

Prints, from one run, with every configuration timed in the same round-robin so that machine noise hits all alike:

* prefill time and per-decode-step time, vanilla / VTW at several K, next to the analytic FLOPs ratio of
  :func:`vtw.flops.count_flops`, and realized / analytic (target >= 0.9);
* the overhead of ``withdraw(model, None)`` against the untouched model (target <= 1 %);
* KV-cache bytes after prefill, vanilla vs VTW, next to :func:`vtw.flops.kv_cache_bytes`.

    python bench/bench_withdraw.py [--layers 16 --hidden 512 --reps 7 --steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T

from vtw import withdraw
from vtw.flops import count_flops, kv_cache_bytes


def build(args) -> T.LlavaForConditionalGeneration:
    text = T.LlamaConfig(
        vocab_size=2000,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),  # LLaMA-7B's 11008 / 4096
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048,
        pad_token_id=0,
    )
    vision = T.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14
    )
    config = T.LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=1999,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return T.LlavaForConditionalGeneration(config).eval()


def inputs_for(model, text_tokens: int) -> dict:
    n_image = (336 // 14) ** 2  # 576, as LLaVA-1.5
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, 1900, (35,), generator=g)  # a system prompt before the image, as LLaVA-1.5
    suffix = torch.randint(1, 1900, (text_tokens - 35,), generator=g)
    ids = torch.cat([prefix, torch.full((n_image,), 1999), suffix])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.rand(1, 3, 336, 336, generator=g),
    }


@torch.no_grad()
def prefill_and_decode(model, inputs, steps: int) -> tuple[float, float, int]:
    """Seconds of one prefill, median seconds of one decode step, KV-cache bytes after prefill."""
    t0 = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    cache = out.past_key_values
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = inputs["attention_mask"]
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        t0 = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, statistics.median(times), kv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=60)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--ks", default="12,8,4,2")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    inputs = inputs_for(model, args.text_tokens)
    L = args.layers
    ks = [int(k) for k in args.ks.split(",")]
    configs: list[tuple[str, int | None]] = [("vanilla", None), ("withdraw(None)", None)] + [(f"K={k}", k) for k in ks]
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in configs}
    prefill_and_decode(model, inputs, 2)  # warm-up
    for _ in range(args.reps):
        for name, k in configs:
            if name == "vanilla":
                times[name].append(prefill_and_decode(model, inputs, args.steps))
            else:
                with withdraw(model, k):
                    times[name].append(prefill_and_decode(model, inputs, args.steps))

    def med(name, i):
        return statistics.median(t[i] for t in times[name])

    n_vision, n_text = 576, args.text_tokens
    cfg = model.config
    steps = args.steps

    def analytic(k):
        r = count_flops(cfg, vision_tokens=n_vision, text_tokens=n_text, generated_tokens=1 + steps, layer=k)
        return r.prefill.total, r.decode.total / steps

    base_prefill, base_step = analytic(None)
    print(
        f"LLaVA-1.5-shaped model: L={L}, d={args.hidden}, {n_vision} vision + {n_text} text tokens, "
        f"CPU threads={torch.get_num_threads()}, medians of {args.reps} round-robin reps ({steps} decode steps each)"
    )
    print(
        f"{'config':<16}{'prefill ms':>11}{'speedup':>9}{'analytic':>10}{'real/an.':>10}"
        f"{'step ms':>10}{'speedup':>9}{'analytic':>10}{'real/an.':>10}{'KV MiB':>9}{'KV analytic':>13}"
    )
    v_pre, v_step = med("vanilla", 0), med("vanilla", 1)
    for name, k in configs:
        pre, step, kv = med(name, 0), med(name, 1), times[name][0][2]
        a_pre, a_step = analytic(k)
        an_pre, an_step = base_prefill / a_pre, base_step / a_step
        s_pre, s_step = v_pre / pre, v_step / step
        kv_an = kv_cache_bytes(
            cfg, vision_tokens=n_vision, text_tokens=n_text, generated_tokens=1, layer=k, dtype="float32"
        ).total
        print(
            f"{name:<16}{pre * 1e3:>11.1f}{s_pre:>9.2f}{an_pre:>10.2f}{s_pre / an_pre:>10.2f}"
            f"{step * 1e3:>10.2f}{s_step:>9.2f}{an_step:>10.2f}{s_step / an_step:>10.2f}"
            f"{kv / 2**20:>9.2f}{kv_an / 2**20:>13.2f}"
        )
    overhead = med("withdraw(None)", 0) / v_pre - 1
    print(
        f"withdraw(model, None) overhead vs untouched model: prefill {overhead * 100:+.2f}% "
        f"(decode step {(med('withdraw(None)', 1) / v_step - 1) * 100:+.2f}%); target <= 1%"
    )


if __name__ == "__main__":
    main()
