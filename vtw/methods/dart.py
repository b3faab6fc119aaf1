"""DART ("Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"): at layer ``K``,
keep the vision tokens least similar to a few pivot tokens, chosen by the largest key norms of layer ``K-1``."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from .base import OneLayer, StageContext, check_int, check_layer
from .ranking import KeepShare, check_keep, kept_count


@dataclass(frozen=True)
class DART(KeepShare, OneLayer):
    """Keep ``n = ceil(keep · V_b)`` of each sample's ``V_b`` vision tokens from layer ``K`` on, chosen for being
    unlike a few *pivot* tokens rather than for their importance, with every text token, at their positions.

    Pivots: the ``pivots`` vision tokens, and the ``pivots`` text tokens after the sample's first vision token (up to
    the last prompt token, :attr:`StageContext.query`), whose keys in layer ``K-1`` have the largest L1 norm (the
    layer's own ``k_proj`` output, caught as it ran, its rotary embedding applied, every key/value head). The image pivots are kept. Then each pivot in
    position order takes its share of the ``n - pivots`` tokens left, the vision tokens not taken yet with the least
    cosine similarity to it, on the input of layer ``K`` passed through the decoder's final norm (what the reference
    compares); ties go to the earlier token. Text pivots only serve as references: text is always kept.

    A sample with ``n >= V_b`` (no vision token: a text-only row) keeps everything; ``n <= pivots`` keeps the ``n``
    image pivots alone. ``keep=1`` keeps everything, so nothing is installed; ``layer=None`` too. The default keep
    is the paper's main setting, 128 of LLaVA-1.5's 576 tokens (reduction ratio 77.8%).
    """

    name = "dart"
    free_parameter = "keep"
    uses_previous_layer = True
    uses_previous_projections = True
    layer: int | None = 2
    keep: float = 128 / 576
    pivots: int = 4

    def __post_init__(self):  # the layer is checked by resolve(), against L
        object.__setattr__(self, "keep", check_keep(self.keep, "dart keep"))
        check_int(self.pivots, "dart pivots", minimum=1)

    def resolve(self, num_layers: int) -> DART:
        if check_layer(self.layer, num_layers, "dart layer") is not None and self.layer < 1:
            raise ValueError(
                f"dart layer must be an integer in [1, {num_layers}] or None (its pivots are chosen by layer K-1's "
                f"keys), got {self.layer!r}"
            )
        return self

    def stages(self) -> tuple[int, ...]:
        return () if self.layer is None or self.keep == 1 else (self.layer,)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        return kept_count(self.keep, vision), text

    @property
    def label(self) -> str:
        where = "" if self.layer is None else f" K={self.layer}"
        return f"dart{where} keep={self.keep:.3g} pivots={self.pivots}"

    def quotas(self, rest: int, pivots: int) -> list[int]:
        """How many of the ``rest`` tokens each of ``pivots`` pivots (in position order) takes: ``rest // pivots``
        each, one more for the first ``rest % pivots``."""
        return [rest // pivots + (j < rest % pivots) for j in range(pivots)]

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """For a sample with ``v`` vision tokens at layer ``K-1`` (``tokens[K-1]``) that drops some (``n < v``), where
        ``n > pivots`` (pivots to pick for): the cosine similarities of the ``2 · pivots`` pivot slots with every
        vision token, ``2 (2 pivots) v D`` (absent text pivots are zero rows, so the count does not depend on the
        text). The keys are layer ``K-1``'s own (no projection is spent); norms, rotary, L1 norms and the sorts are
        no matmuls. ``layout`` is not needed."""
        from ..arch import architecture

        if tokens is None:
            raise ValueError("dart scoring_flops needs the (vision, text) tokens of every decoder layer")
        if not self.stages() or self.layer >= len(tokens):
            return 0
        dec = architecture(config).decoder
        vision = int(tokens[self.layer - 1][0])
        kept = kept_count(self.keep, vision)
        return 2 * (2 * self.pivots) * vision * dec.hidden if self.pivots < kept < vision else 0

    def select(self, ctx: StageContext) -> torch.Tensor:
        real = ctx.attention_mask.bool()
        columns = torch.arange(ctx.vision.shape[1], device=ctx.vision.device)
        prompt = real & (columns[None, :] <= ctx.query_or_last().to(columns.device)[:, None])
        image = ctx.vision & prompt
        first = torch.where(image, columns, columns.numel()).amin(1)
        text = ~ctx.vision & prompt & (columns[None, :] > first[:, None])
        counts = image.sum(1).tolist()
        chosen = [b for b, v in enumerate(counts) if kept_count(self.keep, v) < v]
        keep = torch.ones_like(ctx.vision)
        if not chosen:
            return keep
        if ctx.previous is None or ctx.model is None:
            raise ValueError("dart needs the input of layer K-1 and the model (its final norm) in the stage context")
        prev = ctx.previous
        norms = key_l1_norms(prev.module, prev.hidden, prev.position_embeddings, prev.keys).to(ctx.hidden.device)
        states = final_normed(ctx.model, ctx.hidden)
        for b in chosen:
            kept = self.choose(norms[b], states[b], image[b], text[b], kept_count(self.keep, counts[b]))
            keep[b] = ~image[b]
            keep[b, kept] = True
        return keep

    def choose(
        self, norms: torch.Tensor, states: torch.Tensor, image: torch.Tensor, text: torch.Tensor, count: int
    ) -> torch.Tensor:
        """The ``count`` vision columns one sample keeps (ascending).

        Args:
            norms: ``(T,)`` the key L1 norms of layer ``K-1``; states: ``(T, D)`` the final-normed input of layer
                ``K``; image, text: ``(T,)`` bool, the vision tokens and the text pivot candidates.
        """
        image_cols, text_cols = image.nonzero().flatten(), text.nonzero().flatten()
        image_pivots = largest(norms, image_cols, min(self.pivots, count))
        kept = torch.zeros_like(image)
        kept[image_pivots] = True
        rest = count - image_pivots.numel()
        if rest:
            pivots = torch.cat([image_pivots, largest(norms, text_cols, min(self.pivots, text_cols.numel()))]).sort()
            rows = torch.zeros(2 * self.pivots, states.shape[-1], device=states.device)
            unit = nn.functional.normalize(states.float(), dim=-1)
            rows[: pivots.values.numel()] = unit[pivots.values]
            similarity = rows @ unit[image_cols].T  # (2 pivots, V): one matmul
            taken = kept[image_cols]
            for j, quota in enumerate(self.quotas(rest, pivots.values.numel())):
                ranked = similarity[j].masked_fill(taken, torch.inf)
                taken[torch.sort(ranked, stable=True).indices[:quota]] = True
            kept[image_cols[taken]] = True
        return kept.nonzero().flatten()


def largest(scores: torch.Tensor, columns: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` of ``columns`` ``(N,)`` with the largest ``scores`` ``(T,)`` (ties: the earlier column)."""
    order = torch.sort(scores[columns], descending=True, stable=True).indices
    return columns[order[:count]]


def key_l1_norms(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, T)`` float32: the L1 norm of each token's key in decoder ``layer`` over every key/value head: ``keys``
    ``(B, T, KV·hd)``, the layer's ``k_proj`` output on ``hidden`` ``(B, T, D)`` (``None``: projected here from
    ``input_layernorm(hidden)``), rotated by the layer's own rotary function with ``position_embeddings`` ``(cos,
    sin)`` (the keys its attention caches). The reference repeats the key/value heads to the query heads first, which
    scales every norm alike."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    if keys is None:
        keys = attn.k_proj(layer.input_layernorm(hidden))
    keys = keys.view(batch, length, -1, attn.head_dim).transpose(1, 2)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    _, keys = rotary(keys[:, :1], keys, cos, sin)  # its first output is thrown away: rotate one head there
    return keys.float().abs().sum((1, 3))


def final_normed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``(B, T, D)`` through the language decoder's final norm (what its last layer's output goes through
    before the LM head), on ``hidden``'s device (the norm may sit on another one under a ``device_map``)."""
    from ..families import language_model

    norm = language_model(model).norm
    weight = getattr(norm, "weight", None)
    moved = hidden if weight is None or weight.device.type == "meta" else hidden.to(weight.device)
    return norm(moved).to(hidden.device)
