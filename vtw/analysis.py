"""The paper's two phenomena, measured on one model and its real prompts (``python run.py mode=analyze``).

1. **Attention allocation.** Per decoder layer, the share of attention probability that the prompt's text queries
   (and, separately, its last token) give to the vision tokens, to the first token (the attention sink) and to the
   other text tokens. The probabilities are recomputed from each layer's own q/k projections and rotary function on
   the hidden states it received (:func:`vtw.methods.attention.attention_probs`, equal to eager attention), so the
   model keeps SDPA.
2. **Information migration.** Per layer ``l``, ``KL(P_l || P_full)`` of the last prompt token's next-token
   distribution when every vision token is withdrawn before ``l`` (the layer search's own computation,
   :func:`vtw.search.candidate_logits`), and whether the top-1 token stays the full model's.

Only torch and transformers are used here; the pipeline (:mod:`vtw.pipeline.analyze`) feeds the prompts, writes
``analysis.json`` and the figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import language_model, num_decoder_layers, vision_token_mask
from .methods.attention import attention_probs
from .search import candidate_logits, divergence

PARTS = ("vision", "sink", "text")


def _shares(probs: torch.Tensor, rows: torch.Tensor, vision: torch.Tensor, sink: int) -> torch.Tensor:
    """``(3, H)``: the mean over the query ``rows`` of the probability given to vision keys, to the sink, to the other
    keys (text), per head. probs: ``(H, T, T)``; rows, vision: ``(T,)`` bool."""
    p = probs[:, rows]  # (H, Q, T)
    to_vision = p[..., vision].sum(-1)
    to_sink = p[..., sink]
    to_text = 1.0 - to_vision - to_sink
    return torch.stack([to_vision, to_sink, to_text]).mean(-1)


@dataclass
class SampleAnalysis:
    """One prompt's figures, per decoder layer (``L`` rows).

    Attributes:
        text_shares / last_shares: ``(L, 3, H)``: vision, sink, text shares of the text queries' / the last token's
            attention, per head.
        last_map: ``(L, T)``: the last token's attention over the prompt's positions, mean over heads.
        vision_positions: the prompt positions of its vision tokens.
        kl: ``(L,)``: ``KL(P_l || P_full)`` of the next token with vision withdrawn before ``l``; top1: ``(L,)`` bool,
            the top-1 token unchanged.
    """

    text_shares: torch.Tensor
    last_shares: torch.Tensor
    last_map: torch.Tensor
    vision_positions: list[int]
    kl: torch.Tensor
    top1: torch.Tensor


@torch.no_grad()
def analyze_sample(model: nn.Module, inputs: dict) -> SampleAnalysis:
    """The figures of one prompt (``inputs``: a batch of one, as a processor returns it)."""
    lm = language_model(model)
    num_layers = num_decoder_layers(model)
    captured: dict[int, tuple] = {}

    def capture(index):
        def hook(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"], kwargs.get("position_embeddings"))

        return hook

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    ids = inputs["input_ids"]
    mask2d = inputs.get("attention_mask")
    mask2d = torch.ones_like(ids) if mask2d is None else mask2d
    vision = vision_token_mask(model, ids)[0]
    real = mask2d[0].bool()
    sink = int(torch.nonzero(real)[0])
    text_rows = real & ~vision
    text_rows[sink] = False  # the sink's own row only sees itself
    last_rows = torch.zeros_like(real)
    last_rows[-1] = True
    text_shares, last_shares, last_map = [], [], []
    for i, layer in enumerate(lm.layers):
        hidden, pe = captured[i]
        probs = attention_probs(layer, hidden, pe, mask2d.to(hidden.device))[0]  # (H, T, T)
        v, tr, lr = (x.to(probs.device) for x in (vision, text_rows, last_rows))
        text_shares.append(_shares(probs, tr, v, sink).cpu())
        last_shares.append(_shares(probs, lr, v, sink).cpu())
        last_map.append(probs[:, -1].mean(0).cpu())
        del probs
    full, by_layer = candidate_logits(model, inputs, list(range(num_layers)))
    kl = torch.stack([divergence(by_layer[k], full)[0] for k in range(num_layers)]).cpu()
    top1 = torch.stack([by_layer[k][0].argmax() == full[0].argmax() for k in range(num_layers)]).cpu()
    return SampleAnalysis(
        text_shares=torch.stack(text_shares),
        last_shares=torch.stack(last_shares),
        last_map=torch.stack(last_map),
        vision_positions=torch.nonzero(vision).flatten().tolist(),
        kl=kl,
        top1=top1,
    )


@dataclass
class Analysis:
    """The figures over several prompts: for each layer, the mean and standard deviation over prompts and heads of
    every share, the mean KL and top-1 agreement, and the first prompt's attention map."""

    num_layers: int
    samples: int
    text_shares: dict[str, list[float]] = field(default_factory=dict)  # "<part>_mean" / "<part>_std" -> (L,)
    last_shares: dict[str, list[float]] = field(default_factory=dict)
    kl: list[float] = field(default_factory=list)
    top1_agreement: list[float] = field(default_factory=list)
    last_map: list[list[float]] = field(default_factory=list)  # (L, T) of the first prompt
    vision_positions: list[int] = field(default_factory=list)  # of the first prompt

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _summary(stack: torch.Tensor) -> dict[str, list[float]]:
    """``stack``: ``(N, L, 3, H)`` -> ``{part_mean, part_std}`` over prompts and heads, per layer."""
    n, layers, _, heads = stack.shape
    flat = stack.permute(1, 2, 0, 3).reshape(layers, 3, n * heads).double()
    out = {}
    for j, part in enumerate(PARTS):
        out[f"{part}_mean"] = flat[:, j].mean(-1).tolist()
        out[f"{part}_std"] = (flat[:, j].std(-1, unbiased=False)).tolist()
    return out


def analyze(model: nn.Module, batches: Iterable[dict]) -> Analysis:
    """:func:`analyze_sample` on each prompt (batches of one), aggregated.

    Raises:
        ValueError: no prompts.
    """
    found = [analyze_sample(model, b) for b in batches]
    if not found:
        raise ValueError("the analysis got no prompts: give at least one")
    first = found[0]
    return Analysis(
        num_layers=num_decoder_layers(model),
        samples=len(found),
        text_shares=_summary(torch.stack([s.text_shares for s in found])),
        last_shares=_summary(torch.stack([s.last_shares for s in found])),
        kl=torch.stack([s.kl for s in found]).double().mean(0).tolist(),
        top1_agreement=torch.stack([s.top1 for s in found]).double().mean(0).tolist(),
        last_map=first.last_map.tolist(),
        vision_positions=first.vision_positions,
    )


def verdict(result: Analysis, eta: float, vision_share: float = 0.05) -> str:
    """One line: from which layer on the text queries' share of attention to vision stays below ``vision_share``,
    and the first layer whose mean KL is ``<= eta`` (what the layer search would choose from layer 1)."""
    shares = result.text_shares["vision_mean"]
    low = next((i for i in range(len(shares)) if all(s < vision_share for s in shares[i:])), None)
    kl_ok = next((i for i, k in enumerate(result.kl) if i >= 1 and k <= eta), None)
    parts = [
        f"vision share of text queries' attention stays below {vision_share:.0%} from layer {low} on"
        if low is not None
        else f"vision share of text queries' attention does not stay below {vision_share:.0%} (max {max(shares):.1%})",
        f"KL <= eta={eta:g} from layer {kl_ok}" if kl_ok is not None else f"KL never <= eta={eta:g}",
    ]
    rises = [i for i in range(1, len(shares)) if shares[i] > shares[i - 1] + 0.05]
    if rises:
        parts.append(f"the vision share rises again at layer(s) {', '.join(map(str, rises))}")
    return f"{'; '.join(parts)} ({result.samples} prompts)"
