"""The attention one query gives every key in a decoder layer (or a CLIP vision tower layer: the class token's, for
VisionZip, :func:`class_token_attention`), recomputed from the layer's own weights.

FastV and PyramidDrop rank vision tokens by the attention probabilities of the *last prompt token* (the last input
token, or where a continuation follows and is scored, the token before it). Models run with
SDPA (which never materialises probabilities), and running a layer a second time in eager mode would write a
duplicate KV-cache entry; so the probabilities are recomputed here from what the layer itself uses: its input norm,
its query/key projections, its rotary embedding function (the one its attention module calls, M-RoPE included: in
the pinned transformers the decoder's rotary module already folds the 3-D sections into ``cos``/``sin``) and its
scaling. Only the last query row is computed: ``q`` for one token, ``k`` for all (``k_proj`` over ``T`` tokens is the
cost, counted by the FLOPs model as :func:`last_token_attention_flops`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _query_key(layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, queries: slice | torch.Tensor,
               projected: tuple | None = None):  # fmt: skip
    """``(q (B, H, Tq, hd), k (B, H, T, hd))`` of ``layer`` on ``hidden`` ``(B, T, D)``, rotary applied with the layer's
    own function, key/value heads repeated to the query heads (GQA); ``queries`` selects the query positions: a slice
    of ``T``, a ``(B,)`` long tensor, one position per sample (``Tq = 1``), or ``(B, Tq)`` positions per sample.
    ``projected``: the layer's own ``(q_proj (B, T, H·hd), k_proj (B, T, KV·hd))`` outputs on ``hidden``
    (:attr:`vtw.methods.base.LayerInput.projected`): taken instead of projecting again."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    source = layer.input_layernorm(hidden) if projected is None else projected[0]
    if isinstance(queries, torch.Tensor):
        rows = queries if queries.dim() == 2 else queries[:, None]
        qn, q_cos, q_sin = (gather_rows(t, rows) for t in (source, cos, sin))
    else:
        qn, q_cos, q_sin = source[:, queries], cos[..., queries, :], sin[..., queries, :]
    q = (attn.q_proj(qn) if projected is None else qn).view(batch, qn.shape[1], -1, head_dim).transpose(1, 2)
    k = attn.k_proj(source) if projected is None else projected[1]
    k = k.view(batch, length, -1, head_dim).transpose(1, 2)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, _ = rotary(q, q, q_cos, q_sin)
    _, k = rotary(k[:, :1], k, cos, sin)  # its first output is thrown away: rotate one head there, not all again
    groups = q.shape[1] // k.shape[1]
    return q, k if groups == 1 else k.repeat_interleave(groups, dim=1)


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index[b]`` ``(B, N)`` of sample ``b`` of ``t`` ``(..., B or 1, T, D)``: ``(..., B, N, D)``."""
    lead, (batch, count) = t.shape[:-3], index.shape
    t = t.expand(*lead, batch, *t.shape[-2:])
    idx = index.to(t.device).view(*([1] * len(lead)), batch, count, 1).expand(*lead, batch, count, t.shape[-1])
    return t.gather(-2, idx)


def last_token_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple,
    attention_mask: torch.Tensor,
    query: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of each sample's last token (or its ``query`` token) over every key, mean over
    the query heads.

    Args:
        layer: a decoder layer (``input_layernorm``, ``self_attn`` with ``q_proj``/``k_proj``, ``head_dim``,
            ``scaling``); hidden: ``(B, T, D)`` its input hidden states; position_embeddings: ``(cos, sin)`` of these
            ``T`` tokens as the layer receives them; attention_mask: ``(B, T)``, 1 at real tokens, 0 at padding.
        query: ``(B,)`` long, the position of each sample's querying token (its last prompt token where a
            continuation follows; keys after it are masked out, as causal attention does); ``None``: the last one.

    Returns:
        ``(B, T)`` float32, rows summing to 1 over the real tokens up to the query (0 elsewhere). The same numbers as
        the layer's eager attention weights ``[:, :, -1, :].mean(1)`` (``query``: that row of each sample; GQA: each
        query head attends with its key/value group).
    """
    allowed = attention_mask.bool()
    if query is None:
        q, k = _query_key(layer, hidden, position_embeddings, slice(-1, None))
    else:
        q, k = _query_key(layer, hidden, position_embeddings, query)
        keys = torch.arange(hidden.shape[1], device=allowed.device)
        allowed = allowed & (keys[None, :] <= query.to(allowed.device)[:, None])
    scores = torch.matmul(q, k.transpose(2, 3)) * layer.self_attn.scaling  # (B, H, 1, T)
    scores = scores.masked_fill(~allowed[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs.mean(1)[:, 0]


def rows_attention(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, attention_mask: torch.Tensor, rows,
    projected: tuple | None = None,
) -> torch.Tensor:  # fmt: skip
    """Softmax attention probabilities of the queries at columns ``rows`` ``(B, N)`` over every key, mean over heads:
    ``(B, N, T)`` float32 (causal: keys after a row's column and padding get 0; the numbers the layer's eager
    attention weights hold). Queries are projected for the ``N`` rows only, keys for all ``T`` tokens, or both taken
    from ``projected``, the layer's own projections (:func:`_query_key`); arguments otherwise as
    :func:`last_token_attention`."""
    q, k = _query_key(layer, hidden, position_embeddings, rows, projected)
    scores = torch.matmul(q, k.transpose(2, 3)) * layer.self_attn.scaling  # (B, H, N, T)
    keys = torch.arange(hidden.shape[1], device=hidden.device)
    allowed = (keys[None, None, :] <= rows.to(hidden.device)[:, :, None]) & attention_mask.bool()[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).mean(1)


def attention_probs(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Every query's causal attention probabilities in ``layer``, per head: ``(B, H, T, T)`` float32 (rows of padding
    queries are meaningless). The same numbers as the layer's eager attention weights; arguments as
    :func:`last_token_attention`."""
    q, k = _query_key(layer, hidden, position_embeddings, slice(None))
    length = hidden.shape[1]
    scores = torch.matmul(q, k.transpose(2, 3)) * layer.self_attn.scaling  # (B, H, T, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def head_query_attention(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, allowed: torch.Tensor, query: torch.Tensor,
    head: int,
) -> torch.Tensor:  # fmt: skip
    """Softmax attention probabilities of one query per sample in one head: ``(B, T)`` (training's attention
    guidance differentiates through it). ``query``: ``(B,)`` long positions; ``allowed``: ``(B, T)`` bool, the keys
    the query may attend to (0 elsewhere: the row of the layer's own mask); ``head``: a query head (GQA: it attends
    with its key/value group). Computed in the layer's own dtype; other arguments as :func:`last_token_attention`."""
    q, k = _query_key(layer, hidden, position_embeddings, query)
    scores = torch.einsum("nd,ntd->nt", q[:, head, 0], k[:, head]) * layer.self_attn.scaling
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def last_token_attention_flops(hidden_size: int, heads: int, kv_heads: int, head_dim: int, tokens: int) -> int:
    """Matmul FLOPs of one :func:`last_token_attention` call for one sample of ``tokens`` tokens (1 multiply-add = 2
    FLOPs): the query projection of one token, the key projection of every token, one row of ``q kᵀ``."""
    return (
        2 * hidden_size * heads * head_dim
        + 2 * tokens * hidden_size * kv_heads * head_dim
        + 2 * heads * tokens * head_dim
    )


def class_token_attention(
    layer: nn.Module, hidden: torch.Tensor, mean_keys: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class token's attention and every token's keys in one layer of a CLIP vision tower, recomputed from the
    layer's own ``layer_norm1``, ``q_proj``, ``k_proj`` and scale on the hidden states it received (the tower keeps
    its SDPA; VisionZip's reference patches the attention to return them instead).

    Args:
        layer: a CLIP encoder layer (``layer_norm1``; ``self_attn`` with ``q_proj``, ``k_proj``, ``num_heads``,
            ``head_dim``, ``scale``); hidden: ``(N, S, D)`` its input, token 0 the class token (no padding: every
            tower input is a full image).
        mean_keys: return the keys averaged over heads (VisionZip), else the ``k_proj`` output, every head
            (PruMerge).

    Returns:
        ``(attention (N, S) float32, keys)``: the class token's softmax attention over the ``S`` tokens, mean over
        heads (the eager attention weights ``[:, :, 0, :].mean(1)``), and the keys: ``(N, S, head_dim)`` mean over
        heads, or ``(N, S, D)``.
    """
    attn = layer.self_attn
    count, length, _ = hidden.shape
    normed = layer.layer_norm1(hidden)
    q = attn.q_proj(normed[:, :1]).view(count, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(normed)  # (N, S, D)
    k = keys.view(count, length, attn.num_heads, attn.head_dim).transpose(1, 2)  # (N, H, S, hd)
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scale, dim=-1, dtype=torch.float32)
    return probs.mean(1)[:, 0], (k.mean(1) if mean_keys else keys)


def class_token_attention_flops(hidden_size: int, tokens: int) -> int:
    """Matmul FLOPs of :func:`class_token_attention` for one tower input of ``tokens`` tokens (class token
    included): the query projection of the class token, the key projection of every token, one row of ``q kᵀ``
    over all heads (``heads · head_dim = hidden_size``)."""
    return 2 * hidden_size * hidden_size + 2 * tokens * hidden_size * hidden_size + 2 * tokens * hidden_size
