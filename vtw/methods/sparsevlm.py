"""SparseVLM: text "raters" rank the vision tokens at a few decoder layers; the number kept follows the rank of the
raters' attention; part of what is pruned is recycled into a few aggregated tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .attention import gather_rows, rows_attention
from .base import Extra, Merge, Reduction, StageContext, check_stage_layers, scaled_layers
from .ranking import check_keep, keep_top_vision

#: the reference's scoring layers for a 32-layer decoder (LLaVA-1.5-7B), scaled to ``L`` when ``layers`` is not given
REFERENCE_LAYERS = (2, 6, 15)


@dataclass(frozen=True)
class SparseVLM(Reduction):
    """At each scoring layer ``layers[s]`` (after it runs; its output is what the next layers get):

    1. raters: the sample's candidate text tokens (the text after its first vision token, up to the query) whose
       relevance to the vision tokens is above the candidates' mean. Relevance of text token ``t``: the mean over the
       vision tokens ``v`` of ``softmax_t(h_v · h_t)`` (softmax over the candidates; ``h``: the scoring layer's input
       hidden states); if no candidate is above the mean (all equal), every candidate rates.
    2. scores: ``P`` ``(R, V)``, the raters' attention probabilities to the ``V`` vision tokens in the scoring layer
       (from the layer's own query and key projections, caught as it ran, and its rotary embedding; softmax over every
       key the row sees, mean over heads); a vision token's score is ``P``'s column mean.
    3. count: ``V - floor((1 - keep[s]) · (V - rank P))`` vision tokens with the highest scores go on (ties: the
       earlier first). This is the paper's rule (drop ``λ · (V - rank P)``) with ``λ = 1 - keep[s]``: ``keep[s]`` is
       the share of the stage's current vision tokens (recycled tokens of earlier stages included) kept where the
       raters' attention has rank 0; each unit of rank keeps ``1 - keep[s]`` more. The expected counts
       (:meth:`stage_tokens`: ``count_flops``, ``mode=flops``, ``vtw.budget``) take rank 0, so they are
       ``ceil(keep[s] · V)``: a lower bound of every layer's realized count (``handle.last_layer_tokens``); a stage
       keeps at most ``ceil((1 - keep[s]) · rank P)`` more (``rank P <= R``, the raters, and usually equal).
    4. recycling: of the ``n`` pruned vision tokens, the ``floor(recycle · n) + 1`` with the highest scores
       (none for ``recycle=0``) are clustered into ``floor(clusters · m) + 1`` (at most ``m``) aggregates by the
       reference's density-peak clustering (DPC-kNN on the scoring layer's output values: distance
       ``‖x_i - x_j‖ / sqrt(D)``, density ``exp(-mean of the squared distances to the k nearest)`` with ``k`` the
       number of clusters, centres = highest density × distance to any denser token, every token joins its nearest
       centre); each aggregate is the mean of its members. The aggregates follow the sample's last kept vision token
       (in centre order), take its position, and count as vision tokens: a later stage may prune them again.

    ``layers=None``: the reference's ``(2, 6, 15)`` of 32 layers scaled to ``L`` (``round(2L/32)``, ...). Each
    must be in ``0..L-2``: tokens go from layer ``layers[s] + 1`` on (vtw's stages; the scores come from the layer
    before each stage, as FastV's). ``keep``: one share per stage, in ``(0, 1]``; a stage with ``keep=1`` is not
    installed. Text tokens are always kept; vision tokens from the query on stay (prompt-only ranking).

    Deviations from the reference code (github Gumpest/SparseVLMs, v1 Oct 2024; v1.5 Mar 2025; v2.0 Dec 2025):

    * count: v1 keeps ``min(floor(scale · rank P), V - 1)`` (``scale`` tuned per benchmark, 0.8 .. 13.5); v1.5 and
      v2.0 keep fixed per-layer counts (e.g. 300, 200, 110 of 576 for "192 tokens"), no rank. vtw follows the
      paper's rule above so that ``keep`` is a share with a computable expectation.
    * raters: the reference picks them once, from the decoder's input embeddings, among the tokens after the
      image; vtw picks them again at each stage from the scoring layer's input (the decoder input is not at hand
      at the stage), among the text after the first vision token (several images, interleaved text) up to the
      query.
    * positions: the reference renumbers positions contiguously after each stage (v1, v1.5) and decode positions
      follow each layer's cache length; vtw by default keeps every token's original position (the aggregates share
      their anchor's) and decodes at full-sequence positions, as for every in-decoder method (``withdraw(...,
      positions="compact")`` renumbers as the reference does, 1-D RoPE families).
    * clustering: the reference adds uniform noise of 1e-6 to the densities (random tie-breaking) and divides the
      members' sum by ``count + 1e-6``; vtw breaks ties by order (score order of the recycled tokens) and takes the
      exact mean. The reference inserts the aggregates after the image's kept tokens (one image); vtw after each
      sample's last kept vision token.
    * batches: the reference handles one sample (batch 1); vtw decides per sample, independently of the batch.
    * v2.0's gravity correction (attention divided by a RoPE bias) and priority heads (top half of the heads by
      text-to-vision attention) are not implemented; nor is v2.0's "no recycling, keep position ids" mode except as
      ``recycle=0`` (positions are always kept).
    """

    name = "sparsevlm"
    free_parameter = "scale"
    uses_previous_layer = True
    uses_previous_projections = True
    #: the realized token counts depend on the data (the rank); :meth:`layer_tokens` gives a lower bound of them
    counts_depend_on_data: ClassVar[bool] = True
    layers: tuple[int, ...] | None = None
    keep: tuple[float, ...] = (0.5, 0.5, 0.5)
    recycle: float = 0.3
    clusters: float = 0.1

    def __post_init__(self):
        keep = tuple(self.keep) if isinstance(self.keep, (list, tuple)) else (self.keep,)
        keep = tuple(check_keep(k, "sparsevlm keep") for k in keep)
        if not keep:
            raise ValueError(f"sparsevlm keep must be a non-empty list of shares in (0, 1], got {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "recycle", _share(self.recycle, "sparsevlm recycle", "[0, 1]", zero=True))
        object.__setattr__(self, "clusters", _share(self.clusters, "sparsevlm clusters", "(0, 1]", zero=False))
        object.__setattr__(self, "layers", check_stage_layers(self.layers, keep, "sparsevlm"))

    def resolve(self, num_layers: int) -> SparseVLM:
        layers = (
            self.layers
            if self.layers is not None
            else scaled_layers(REFERENCE_LAYERS, self.keep, num_layers, "sparsevlm")
        )
        if not all(0 <= k <= num_layers - 2 for k in layers):
            raise ValueError(
                f"sparsevlm layers {list(layers)} are out of range: allowed 0..{num_layers - 2} (L={num_layers}; "
                "tokens go from the layer after each)"
            )
        return replace(self, layers=layers)

    def _active(self) -> list[int]:
        """Indices of the stages that drop something (``keep < 1``)."""
        return [s for s, k in enumerate(self.keep) if k < 1]

    def stages(self) -> tuple[int, ...]:
        if self.layers is None:
            raise ValueError("sparsevlm: resolve(num_layers) first (the default layers depend on L)")
        return tuple(self.layers[s] + 1 for s in self._active())

    # ------------------------------------------------------------------ counts
    def kept_vision(self, stage: int, vision: int, rank: int = 0) -> int:
        """Vision tokens kept (recycled ones aside) by ``stage`` of ``vision``, when the raters' attention has
        ``rank``: ``V - floor((1 - keep) · (V - rank))``."""
        share = self.keep[self._active()[stage]]
        return vision - math.floor(round((1 - share) * (vision - min(rank, vision)), 9))

    def aggregates(self, pruned: int) -> int:
        """Aggregated tokens the recycling makes of ``pruned`` pruned vision tokens."""
        recycled = self.recycled(pruned)
        return min(recycled, math.floor(round(self.clusters * recycled, 9)) + 1) if recycled else 0

    def recycled(self, pruned: int) -> int:
        """Pruned tokens recycled: ``floor(recycle · n) + 1`` of ``n`` (at most ``n``; none for ``recycle=0``)."""
        if not pruned or not self.recycle:
            return 0
        return min(pruned, math.floor(round(self.recycle * pruned, 9)) + 1)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        kept = self.kept_vision(stage, vision)
        return kept + self.aggregates(vision - kept), text

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """Per stage, on the ``(v, t)`` tokens of its scoring layer (``tokens[layers[s]]``): the relevance
        ``h_v · h_t`` of every vision and text token (``2 v t D``) and the text rows of ``q kᵀ`` over all heads (the
        queries and keys are the scoring layer's own projections, caught as it ran: no projection is spent).
        Softmax, means, the rank (an SVD) and the clustering's distances are no matmuls; a stage with no vision or no
        text token spends nothing."""
        from ..arch import architecture

        if tokens is None:
            raise ValueError("sparsevlm scoring_flops needs the (vision, text) tokens of every decoder layer")
        dec = architecture(config).decoder
        resolved = self.resolve(dec.num_layers)
        total = 0
        for stage in resolved.stages():
            v, t = (int(x) for x in tokens[stage - 1])
            if v == 0 or t == 0:
                continue
            total += 2 * v * t * dec.hidden + 2 * dec.heads * t * (v + t) * dec.head_dim
        return total

    def budget_candidates(self, num_layers: int) -> list[SparseVLM]:
        """The keep shares scaled by a common factor ``s`` (capped at 1): ``s`` from 0.01 up to where every share is
        1, on a geometric grid of 200 steps (expected compute grows with ``s``)."""
        top = 1.0 / min(self.keep)
        out = []
        for i in range(200):
            scale = 0.01 * (top / 0.01) ** (i / 199)
            keep = tuple(min(1.0, round(k * scale, 6)) for k in self.keep)
            if all(k > 0 for k in keep):
                out.append(replace(self, keep=keep))
        return out

    @property
    def label(self) -> str:
        layers = "auto" if self.layers is None else ",".join(map(str, self.layers))
        shares = ",".join(f"{k:.3g}" for k in self.keep)
        return f"sparsevlm L={layers} keep={shares} recycle={self.recycle:.3g} clusters={self.clusters:.3g}"

    # ------------------------------------------------------------------ the choice
    def select(self, ctx: StageContext) -> torch.Tensor | Merge:
        prev = ctx.previous
        if prev is None:
            raise RuntimeError(f"{self.label}: stage {ctx.stage} got no input of its scoring layer")
        vision, candidates, text = _token_sets(ctx)
        keep = torch.ones_like(ctx.vision)
        if not bool(vision.any()) or not bool(text.any()):
            return keep
        text_cols, text_valid = _columns(text)
        vis_cols, vis_valid = _columns(ctx.vision & ctx.attention_mask.bool())
        relevance = _relevance(prev.hidden, vis_cols, vis_valid & vision.gather(1, vis_cols), text_cols)
        probs = rows_attention(prev.module, prev.hidden, prev.position_embeddings, ctx.attention_mask, text_cols,
                               prev.projected)  # fmt: skip
        cand_rows = candidates.gather(1, text_cols) & text_valid
        scores = torch.zeros(ctx.vision.shape, dtype=torch.float32, device=ctx.vision.device)
        counts, groups = [], []
        for b in range(keep.shape[0]):
            cols = torch.nonzero(vision[b]).flatten()
            raters = _raters(relevance[b], cand_rows[b])
            if cols.numel() == 0 or raters is None:
                counts.append(cols.numel())
                continue
            matrix = probs[b, raters][:, cols]  # (R, V)
            scores[b, cols] = matrix.mean(0)
            counts.append(self.kept_vision(ctx.stage, cols.numel(), int(torch.linalg.matrix_rank(matrix))))
        keep = keep_top_vision(scores, vision, counts)
        for b in range(keep.shape[0]):
            groups.append(self._recycle(ctx.hidden[b], scores[b], vision[b], keep[b]))
        extra = _extra(groups, ctx.hidden)
        return keep if extra is None else Merge(keep, None, extra)

    def _recycle(self, hidden: torch.Tensor, scores: torch.Tensor, vision: torch.Tensor, keep: torch.Tensor):
        """One sample's aggregates: ``(values (c, D), anchor column)`` or ``None``; ``hidden`` ``(T, D)`` the values
        going on, ``scores`` ``(T,)``, ``vision`` the prunable vision columns, ``keep`` the choice (``(T,)`` bool)."""
        pruned = vision & ~keep
        count = self.recycled(int(pruned.sum()))
        if not count:
            return None
        ranked = torch.where(pruned, scores, torch.full_like(scores, -torch.inf))
        picked = torch.sort(ranked, descending=True, stable=True).indices[:count]
        values = cluster_mean(hidden[picked].float(), self.aggregates(int(pruned.sum())))
        anchor = int(torch.nonzero(vision & keep).flatten().max())
        return values.to(hidden.dtype), anchor


def _share(value, what: str, allowed: str, zero: bool) -> float:
    low_ok = value >= 0 if zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value <= 1):
        raise ValueError(f"{what} must be a number in {allowed}, got {value!r}")
    return float(value)


def _token_sets(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(vision, candidates, text)``, ``(B, T)`` bool: the prunable vision tokens (real, before the query), the
    candidate raters (real text after the sample's first vision token, up to the query) and every real text
    token."""
    real = ctx.attention_mask.bool()
    cols = torch.arange(ctx.vision.shape[1], device=real.device)[None, :]
    query = ctx.query_or_last().to(real.device)[:, None]
    vision = ctx.vision & real & (cols < query)
    text = ~ctx.vision & real
    first = torch.where(vision, cols, ctx.vision.shape[1]).min(1, keepdim=True).values
    return vision, text & (cols > first) & (cols <= query), text


def _columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cols (B, N), valid (B, N))``: each row's True columns in order, padded with 0 to ``N = max count``."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.shape[0] else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), valid


def _relevance(hidden: torch.Tensor, vis_cols, vis_valid, text_cols) -> torch.Tensor:
    """``(B, N_text)`` float32: ``h_v · h_t`` of every vision and text token (``hidden`` ``(B, T, D)``), as the
    rater selection's one matmul; :func:`_raters` normalises over the candidates."""
    dots = torch.matmul(gather_rows(hidden, vis_cols).float(), gather_rows(hidden, text_cols).float().transpose(1, 2))
    return torch.where(vis_valid[:, :, None], dots, torch.nan)  # (B, N_vis, N_text), NaN at rows not counted


def _raters(dots: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | None:
    """The rows (of the text columns) that rate: ``dots`` ``(N_vis, N_text)`` (NaN rows: not vision tokens of the
    stage), ``candidates`` ``(N_text,)`` bool. ``None`` where there is no candidate or no vision row."""
    rows = ~torch.isnan(dots[:, 0]) if dots.shape[1] else torch.zeros(0, dtype=torch.bool)
    if not bool(candidates.any()) or not bool(rows.any()):
        return None
    cand = torch.nonzero(candidates).flatten()
    relevance = torch.softmax(dots[rows][:, cand], dim=1).mean(0)  # (n_candidates,)
    above = relevance > relevance.mean()
    return cand[above] if bool(above.any()) else cand


def cluster_mean(x: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` aggregates of the ``m`` tokens ``x`` ``(m, D)`` by density-peak clustering (the reference's DPC-kNN,
    without its random jitter): ``(count, D)``, each the mean of a cluster, in centre order (highest centre score
    first; ties: the earlier token)."""
    m, dim = x.shape
    # exact differences, no (m, m, D) intermediate and no matmul
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(dim)
    nearest = torch.sort(dist, dim=1).values[:, :count]
    density = torch.exp(-(nearest**2).mean(1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, dist, dist.max()).min(1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:count]
    member = dist[centres].argmin(0)  # (m,) index into centres (ties: the first centre)
    member[centres] = torch.arange(count, device=x.device)
    sums = torch.zeros(count, dim, dtype=x.dtype, device=x.device).index_add_(0, member, x)
    return sums / torch.bincount(member, minlength=count).to(x.dtype)[:, None]


def _extra(groups: list, hidden: torch.Tensor) -> Extra | None:
    """The :class:`Extra` of the samples' ``(values (c_b, D), anchor)`` (``None``: a sample adds nothing)."""
    width = max((g[0].shape[0] for g in groups if g is not None), default=0)
    if not width:
        return None
    batch, device = len(groups), hidden.device
    values = torch.zeros(batch, width, hidden.shape[-1], dtype=hidden.dtype, device=device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    after = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, group in enumerate(groups):
        if group is not None:
            n = group[0].shape[0]
            values[b, :n], valid[b, :n], after[b, :] = group[0], True, group[1]
    return Extra(hidden=values, valid=valid, after=after)
