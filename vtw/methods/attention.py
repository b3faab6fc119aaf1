"""The attention one query gives every key in a decoder layer, recomputed from the layer's own weights.

FastV and PyramidDrop rank vision tokens by the attention probabilities of the *last prompt token*. Models run with
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


def last_token_attention(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Softmax attention probabilities of each sample's last token over every key, mean over the query heads.

    Args:
        layer: a decoder layer (``input_layernorm``, ``self_attn`` with ``q_proj``/``k_proj``, ``head_dim``,
            ``scaling``); hidden: ``(B, T, D)`` its input hidden states; position_embeddings: ``(cos, sin)`` of these
            ``T`` tokens as the layer receives them; attention_mask: ``(B, T)``, 1 at real tokens, 0 at padding.

    Returns:
        ``(B, T)`` float32, rows summing to 1 over the real tokens (0 at padding). The same numbers as the layer's
        eager attention weights ``[:, :, -1, :].mean(1)`` (GQA: each query head attends with its key/value group).
    """
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    head_dim = attn.head_dim
    q = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    cos, sin = position_embeddings
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, _ = rotary(q, q, cos[..., -1:, :], sin[..., -1:, :])
    _, k = rotary(k, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, T, hd)
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # (B, H, 1, T)
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs.mean(1)[:, 0]


def last_token_attention_flops(hidden_size: int, heads: int, kv_heads: int, head_dim: int, tokens: int) -> int:
    """Matmul FLOPs of one :func:`last_token_attention` call for one sample of ``tokens`` tokens (1 multiply-add = 2
    FLOPs): the query projection of one token, the key projection of every token, one row of ``q kᵀ``."""
    return (
        2 * hidden_size * heads * head_dim
        + 2 * tokens * hidden_size * kv_heads * head_dim
        + 2 * heads * tokens * head_dim
    )
