"""Benchmark of the VTW core on a LLaVA-1.5-shaped tiny model (CPU): measured speedups next to the analytic ones.

Prints, from one run, with every configuration timed in the same round-robin so that machine noise hits all alike:

* prefill time and per-decode-step time, vanilla / VTW at several K, next to the analytic FLOPs ratio of
  :func:`vtw.flops.count_flops`, and realized / analytic (target >= 0.9);
* the overhead of ``withdraw(model, None)`` against the untouched model (target <= 1 %);
* KV-cache bytes after prefill, vanilla vs VTW, next to :func:`vtw.flops.kv_cache_bytes`.

    python bench/bench_withdraw.py [--layers 16 --hidden 512 --reps 7 --steps 16]

On a GPU, the real shapes of a shipped checkpoint, random-initialised directly on the device (speed does not depend on
the weights; nothing is downloaded; no CPU copy is made), with peak GPU memory per configuration; one command, K = 8,
16, 24 (L/4, L/2, 3L/4), bfloat16, about a minute on one GPU after the start-up:

    python bench/bench_withdraw.py --config llava-1.5-7b

``--config`` takes the shipped configs with one fixed-size image per prompt (LLaVA-1.5 7B/13B, Video-LLaVA);
``--shrink`` (tests) cuts the decoder and the vision tower to a few small layers of the same family.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T

from vtw import get_family, withdraw
from vtw.flops import SampleCounts, count_flops, kv_cache_bytes, load_model_config
from vtw.methods import Withdrawal


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


def build_video(args) -> T.VideoLlavaForConditionalGeneration:
    """A Video-LLaVA-shaped model: :func:`build`'s decoder, a small CLIP tower on 224 px frames of 14 px patches
    (257 tokens per frame, its class token included), for the video methods (``bench_methods.py --video``)."""
    image = build(args)
    vision = T.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14
    )
    config = T.VideoLlavaConfig(
        text_config=image.config.text_config, vision_config=vision, image_token_index=1998, video_token_index=1999
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return T.VideoLlavaForConditionalGeneration(config).eval()


def video_inputs_for(model, text_tokens: int, frames: int) -> dict:
    """One prompt: 35 text tokens, one video of ``frames`` frames (``frames x 257`` tokens), the rest of the text."""
    config = model.config
    vision = config.vision_config
    per_frame = (vision.image_size // vision.patch_size) ** 2 + 1
    g = torch.Generator().manual_seed(0)
    text = torch.randint(2, 1900, (text_tokens,), generator=g)
    ids = torch.cat([text[:35], torch.full((frames * per_frame,), config.video_token_id), text[35:]])[None]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = torch.rand(1, frames, 3, vision.image_size, vision.image_size, generator=g).to(device, dtype)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values_videos": pixels,
    }


def build_shipped(name: str, device: torch.device, dtype: torch.dtype, shrink: bool = False):
    """A shipped checkpoint's architecture (``--config``), random-initialised directly on ``device`` in ``dtype``."""
    config = load_model_config(name)
    family = get_family(config)
    if family.anyres or family.layout.native_grid:
        raise SystemExit(f"--config {name}: {family.display} prompts are not one fixed-size image; use llava-1.5-7b, "
                         "llava-1.5-13b or video-llava-7b")  # fmt: skip
    if shrink:
        text, vision = config.get_text_config(), config.vision_config
        text.num_hidden_layers, text.hidden_size, text.intermediate_size = 4, 64, 128
        text.num_attention_heads = text.num_key_value_heads = 2
        text.head_dim = 32
        vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size, vision.num_attention_heads = (
            2,
            32,
            64,
            2,
        )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(T, family.model_class)._from_config(config, dtype=dtype)
    return model.eval()


def inputs_for(model, text_tokens: int) -> dict:
    """One prompt: 35 text tokens (a system prompt, as LLaVA-1.5), the image's tokens, the rest of the text."""
    config = model.config
    family = get_family(config)
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2  # 576 for LLaVA-1.5, 256 for Video-LLaVA
    image_id = family.vision_token_ids(config)[0]
    vocab = config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, min(1900, vocab - 1), (text_tokens,), generator=g)
    text[text == image_id] = 1
    ids = torch.cat([text[:35], torch.full((n_image,), image_id), text[35:]])[None]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = torch.rand(1, 3, vision.image_size, vision.image_size, generator=g).to(device, dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), family.image_key: pixels}


@torch.no_grad()
def prefill_and_decode(model, inputs, steps: int) -> tuple[float, float, int]:
    """Seconds of one prefill, median seconds of one decode step, KV-cache bytes after prefill."""
    device = inputs["input_ids"].device
    sync(device)
    t0 = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - t0
    cache = out.past_key_values
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = inputs["attention_mask"]
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, statistics.median(times), kv


def model_options(description: str) -> argparse.ArgumentParser:
    """The options of the benchmark model (the LLaVA-1.5-shaped tiny one, or ``--config``) and its timing, shared
    by the benchmarks."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=60)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--config", default=None, help="a shipped checkpoint's shapes, e.g. llava-1.5-7b (random init)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on cuda)")
    p.add_argument("--shrink", action="store_true", help="with --config: a few small layers (smoke test)")
    return p


def load(args):
    """The benchmark model of ``args`` (:func:`model_options`), on its device in its dtype; sets ``args.layers`` /
    ``args.hidden`` to the model's. Returns ``(model, device, dtype)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.config:
        model = build_shipped(args.config, device, dtype, shrink=args.shrink)
        args.layers = model.config.get_text_config().num_hidden_layers
        args.hidden = model.config.get_text_config().hidden_size
    else:
        model = build(args).to(device, dtype)
    return model, device, dtype


def load_video(args):
    """:func:`build_video` on the device and dtype of ``args`` (as :func:`load`). Returns ``(model, device, dtype)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return build_video(args).to(device, dtype), device, dtype


def describe(args, device: torch.device, dtype: torch.dtype, n_vision: int) -> str:
    """The first words of a benchmark's header: the model's shapes, the prompt, device and dtype."""
    shape = f"{args.config} shapes (random init)" if args.config else "LLaVA-1.5-shaped model"
    if getattr(args, "video", 0):
        shape = "Video-LLaVA-shaped model"
    threads = f", CPU threads={torch.get_num_threads()}" if device.type == "cpu" else ""
    return (f"{shape}: L={args.layers}, d={args.hidden}, {n_vision} vision + {args.text_tokens} text tokens, "
            f"{device}, {str(dtype).removeprefix('torch.')}{threads}")  # fmt: skip


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = model_options(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--ks", default=None, help="layers K (default: 12,8,4,2; with --config 3L/4, L/2, L/4)")
    args = p.parse_args()
    model, device, dtype = load(args)
    inputs = inputs_for(model, args.text_tokens)
    L = args.layers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.ks:
        ks = [int(k) for k in args.ks.split(",")]
    else:
        ks = [3 * L // 4, L // 2, L // 4] if args.config else [12, 8, 4, 2]
    configs: list[tuple[str, int | None]] = [("vanilla", None), ("withdraw(None)", None)] + [(f"K={k}", k) for k in ks]
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in configs}
    peak: dict[str, float] = {}
    prefill_and_decode(model, inputs, 2)  # warm-up
    for _ in range(args.reps):
        for name, k in configs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if name == "vanilla":
                times[name].append(prefill_and_decode(model, inputs, args.steps))
            else:
                with withdraw(model, k):
                    times[name].append(prefill_and_decode(model, inputs, args.steps))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)

    def med(name, i):
        return statistics.median(t[i] for t in times[name])

    n_vision = int((inputs["input_ids"] == get_family(model.config).vision_token_ids(model.config)[0]).sum())
    n_text = args.text_tokens
    cfg = model.config
    steps = args.steps

    def analytic(k):
        r = count_flops(cfg, SampleCounts(n_vision, n_text, generated_tokens=1 + steps), Withdrawal(layer=k))
        return r.prefill.total, r.decode.total / steps

    base_prefill, base_step = analytic(None)
    print(
        f"{describe(args, device, dtype, n_vision)}, medians of {args.reps} round-robin reps ({steps} decode steps each)"
    )
    print(
        f"{'config':<16}{'prefill ms':>11}{'speedup':>9}{'analytic':>10}{'real/an.':>10}"
        f"{'step ms':>10}{'speedup':>9}{'analytic':>10}{'real/an.':>10}{'KV MiB':>9}{'KV analytic':>13}"
        + (f"{'peak GiB':>10}" if peak else "")
    )
    v_pre, v_step = med("vanilla", 0), med("vanilla", 1)
    for name, k in configs:
        pre, step, kv = med(name, 0), med(name, 1), times[name][0][2]
        a_pre, a_step = analytic(k)
        an_pre, an_step = base_prefill / a_pre, base_step / a_step
        s_pre, s_step = v_pre / pre, v_step / step
        kv_an = kv_cache_bytes(
            cfg, SampleCounts(n_vision, n_text, generated_tokens=1), Withdrawal(layer=k), dtype=dtype
        )
        kv_an = kv_an.total
        print(
            f"{name:<16}{pre * 1e3:>11.1f}{s_pre:>9.2f}{an_pre:>10.2f}{s_pre / an_pre:>10.2f}"
            f"{step * 1e3:>10.2f}{s_step:>9.2f}{an_step:>10.2f}{s_step / an_step:>10.2f}"
            f"{kv / 2**20:>9.2f}{kv_an / 2**20:>13.2f}" + (f"{peak[name]:>10.2f}" if peak else "")
        )
    if peak:
        print("peak GiB: torch.cuda.max_memory_allocated over each config's runs (the weights included)")
    overhead = med("withdraw(None)", 0) / v_pre - 1
    print(
        f"withdraw(model, None) overhead vs untouched model: prefill {overhead * 100:+.2f}% "
        f"(decode step {(med('withdraw(None)', 1) / v_step - 1) * 100:+.2f}%); target <= 1%"
    )


if __name__ == "__main__":
    main()
