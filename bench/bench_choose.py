"""Cost of ``vtw.method=auto`` (:func:`vtw.choose.choose_method`) next to the equivalent lone runs, measured side by
side in one run on the embedded ``tiny-llava`` and its ``vtw_synthvqa`` validation prompts (CPU, offline).

The choice runs the full model once per prompt and every candidate once at its budget share; the equivalent lone runs
(what a sweep of ``vtw.method=<name> vtw.budget=F`` jobs that each compare with their own baseline does on the same
prompts) run the full model again for every candidate. Printed: wall seconds of both, their ratio, and the FLOPs of
both in full prefills per prompt (exact, from the realized tokens), with the bound ``1.5 x (1 + sum of shares)``.

    python bench/bench_choose.py [--prompts 32 --budget 0.5 --layer 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw.choose import choose_method, greedy_run
from vtw.flops import SampleCounts
from vtw.flops.budget import match_budget
from vtw.pipeline.config import build_method, compose_config, validate_config
from vtw.synthvqa.generator import iter_items
from vtw.synthvqa.model import conversation_text

ASSET = Path(__file__).resolve().parents[1] / "vtw" / "assets" / "tiny-llava"


def prompts_of(model, processor, count: int) -> tuple[list[dict], list[SampleCounts]]:
    """``count`` validation items as model inputs (a batch of one each) and their :class:`~vtw.flops.SampleCounts`."""
    samples, prompts = [], []
    image_id = model.config.image_token_id
    for item in iter_items("validation", count):
        text = conversation_text(processor.tokenizer, [(item.prompt, item.answer)], add_generation_prompt=True)
        inputs = dict(processor(images=[item.image()], text=[text], return_tensors="pt"))
        vision = int((inputs["input_ids"] == image_id).sum())
        samples.append(inputs)
        prompts.append(SampleCounts(vision, inputs["input_ids"].shape[1] - vision, vision_inputs=1))
    return samples, prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    model = LlavaForConditionalGeneration.from_pretrained(ASSET, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    samples, prompts = prompts_of(model, processor, args.prompts)
    spec = validate_config(compose_config(["vtw.method=auto", f"vtw.budget={args.budget}", f"vtw.layer={args.layer}",
                                           "logger=none"]))  # fmt: skip  # the candidates as vtw.method=auto has them
    layers = model.config.get_text_config().num_hidden_layers
    candidates = [build_method(name, args.layer, {}).resolve(layers) for name in spec.vtw.candidates]
    t0 = time.perf_counter()
    choice = choose_method(model, samples, prompts, candidates, args.budget, args.max_new_tokens)
    choose_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for method in candidates:  # a lone run: its own full-model reference, then the method at the budget
            setting = match_budget(model.config, prompts, method, args.budget).method
            for s in samples:
                greedy_run(model, s, args.max_new_tokens)
                greedy_run(model, s, args.max_new_tokens, setting)
    lone_s = time.perf_counter() - t0
    cost = choice.cost
    print(f"tiny-llava, {args.prompts} vtw_synthvqa validation prompts, budget {args.budget:g}, "
          f"{len(candidates)} candidates at layer {args.layer}: chosen {choice.chosen}")  # fmt: skip
    print(f"{'':24}{'wall s':>10}{'full prefills / prompt':>26}")
    print(f"{'choice':24}{choose_s:>10.1f}{cost['prefills_per_prompt']:>26.2f}")
    print(f"{'lone runs':24}{lone_s:>10.1f}{cost['lone_runs_prefills_per_prompt']:>26.2f}")
    print(f"{'ratio lone / choice':24}{lone_s / choose_s:>10.2f}"
          f"{cost['lone_runs_prefills_per_prompt'] / cost['prefills_per_prompt']:>26.2f}")  # fmt: skip
    print(f"choice FLOPs, prefill + decode from the realized tokens: {cost['flops_per_prompt_in_full_prefills']:.2f} "
          f"full prefills per prompt; bound 1.5 x (1 + sum of shares) = {cost['bound']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
