"""Visual Tokens Withdrawal on one model instance, with forward hooks that :meth:`WithdrawalHandle.remove` undoes.

What happens, for a model whose language decoder has ``L`` layers and withdrawal layer ``K`` (0-based):

* Prefill (the cache is empty): layers ``0..K-1`` run on every token. A pre-hook on layer ``K`` asks the reducer which
  positions to keep (VTW: every non-vision token), gathers them from the hidden states, the rotary position
  embeddings (so kept tokens keep their full-sequence positions, M-RoPE included) and the position ids, and builds a
  causal + padding mask for the shorter sequence. Samples keep different numbers of tokens, so the kept tokens of each
  sample are packed in order and left-padded to ``T_out = max_b #kept_b`` (input padding is dropped as well). Layers ``K+1..L-1`` get the same tensors.
  The deep layers' KV cache therefore holds the kept tokens only.
* Decode steps (the cache is not empty): new tokens are text. Layers ``< K`` attend over the full cache as usual;
  layers ``>= K`` get a mask built from the deep cache's own padding mask extended by the new tokens. Positions come
  from the model as usual (the full-sequence length, held by layer 0's cache), so they continue from the full sequence.

Output: the decoder's last hidden state and the logits cover the ``T_out`` packed positions. Because of the left
padding the last output position is every sample's last input token, so ``generate`` (greedy, sampling,
``logits_to_keep``) works unchanged. :attr:`WithdrawalHandle.last_keep_index` maps output positions back to input
positions.

Hooks are registered on this instance's modules only (no class is patched); several models in one process can use
different ``K``. ``layer=None`` and ``layer=L`` register nothing: the model is untouched.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .families import get_family, language_model, num_decoder_layers, vision_token_mask
from .reducers import Reducer, get_reducer

SUPPORTED_ATTENTION = ("eager", "sdpa")


def validate_layer(layer, num_layers: int) -> int | None:
    """Check a withdrawal layer: ``None`` or an int in ``[0, num_layers]``; returns it, else ``ValueError``."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"withdrawal layer must be an integer in [0, {num_layers}] or None, got {layer!r} ({type(layer).__name__})"
        )
    if not 0 <= layer <= num_layers:
        raise ValueError(f"withdrawal layer {layer} is out of range: allowed 0..{num_layers} (L={num_layers}) or None")
    return layer


@dataclass
class _Prefill:
    """Tensors shared by layers ``K..L-1`` during one prefill forward."""

    keep_index: torch.Tensor  # (B, T_out) long, input position of each output position, -1 = padding
    gather_index: torch.Tensor  # (B, T_out) long, keep_index with -1 replaced by 0
    mask4d: torch.Tensor | None = None  # (B, 1, T_out, T_out) additive float mask, built at layer K
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None


class WithdrawalHandle:
    """Withdrawal installed on one model instance. Use :func:`withdraw` to create it.

    Attributes:
        layer: the withdrawal layer ``K`` (or ``None``).
        num_layers: ``L``, the number of decoder layers.
        active: whether hooks are installed (False for ``None`` and ``K = L``).
        last_keep_index: ``(B, T_out)`` long tensor of the last prefill: input position of each output position,
            ``-1`` where the repacking added left padding. ``None`` before any prefill.
        last_num_kept: ``(B,)`` number of positions each sample kept in the last prefill (its text tokens for VTW).
    """

    def __init__(self, model: nn.Module, layer: int | None, method: str | Reducer = "vtw"):
        self.family = get_family(model)  # unsupported model: ValueError listing the supported ones
        self.num_layers = num_decoder_layers(model)
        self.layer = validate_layer(layer, self.num_layers)
        self.method = method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)
        self._reducer = get_reducer(method) if isinstance(method, str) else method
        self._model_ref = weakref.ref(model)
        self._hooks: list = []
        self._explicit_vision_mask: torch.Tensor | None = None
        self.last_keep_index: torch.Tensor | None = None
        self.last_num_kept: torch.Tensor | None = None
        # per-forward state
        self._vision: torch.Tensor | None = None  # (B, T) vision mask of the current prefill
        self._attn2d: torch.Tensor | None = None  # (B, T_full) 2-D padding mask passed to the current forward
        self._prefill: _Prefill | None = None
        self._decode_mask: torch.Tensor | None = None  # (B, 1, q, kv_deep) for the current decode step
        # across forwards of one generation: the deep layers' padding mask and the cache it belongs to
        self._deep_mask2d: torch.Tensor | None = None  # (B, kv_deep)
        self._cache_ref = None
        self.active = self.layer is not None and self.layer < self.num_layers
        if self.active:
            self._install(model)

    # ------------------------------------------------------------------ public
    @property
    def removed(self) -> bool:
        return self.active and not self._hooks

    def remove(self) -> None:
        """Undo the withdrawal: remove every hook; the model behaves exactly as before."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._reset_generation()

    def __enter__(self) -> WithdrawalHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def vision_mask(self, mask: torch.Tensor) -> Iterator[None]:
        """Give the vision mask explicitly, for forwards called with ``inputs_embeds`` and no ``input_ids``.

        Args:
            mask: ``(B, T)`` bool, True at vision tokens of the prompt.
        """
        self._explicit_vision_mask = mask.bool()
        try:
            yield
        finally:
            self._explicit_vision_mask = None

    def __repr__(self) -> str:
        return f"WithdrawalHandle(layer={self.layer}, num_layers={self.num_layers}, method={self.method!r}, active={self.active})"

    # ------------------------------------------------------------------ hooks
    def _install(self, model: nn.Module) -> None:
        cfg = model.config.get_text_config()
        impl = getattr(cfg, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {impl!r} is not supported by vtw; load the model with "
                f"attn_implementation in {SUPPORTED_ATTENTION}"
            )
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types[self.layer :]):
            raise ValueError(
                f"layers {self.layer}..{self.num_layers - 1} include non-full attention ({sorted(set(layer_types))}); "
                "vtw supports full-attention decoders only"
            )
        self._attn_impl = impl
        layers = language_model(model).layers
        self._hooks.append(model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._on_model_end, with_kwargs=True))
        for i in range(self.layer, self.num_layers):
            hook = self._on_withdraw_layer if i == self.layer else self._on_deep_layer
            self._hooks.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    def _reset_generation(self) -> None:
        self._deep_mask2d = None
        self._cache_ref = None
        self._prefill = None
        self._decode_mask = None
        self._vision = None

    def _deep_mask(self, mask2d: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The deep layers' mask, or ``None`` where the attention kernel's own default is the same thing.

        Without padding, one query attends to every cached key (both kernels' behaviour without a mask), and SDPA
        runs causal for ``q_len == kv`` without a mask; skipping the mask then keeps SDPA on its fast path, as
        transformers itself does for the untouched model.
        """
        if bool(mask2d.bool().all()) and (q_len == 1 or (self._attn_impl == "sdpa" and q_len == mask2d.shape[1])):
            return None
        return additive_causal_mask(mask2d, q_len=q_len, dtype=dtype)

    def _on_model_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        attn2d = kwargs.get("attention_mask")
        if attn2d is not None and attn2d.dim() != 2:
            raise ValueError("vtw needs a 2-D (batch, sequence) attention_mask, got shape " + str(tuple(attn2d.shape)))
        past = cache.get_seq_length() if cache is not None else 0
        self._prefill = None
        self._decode_mask = None
        if input_ids is not None:
            vision = vision_token_mask(module.config, input_ids)
            if self._explicit_vision_mask is not None:
                vision = vision | self._explicit_vision_mask.to(vision.device)
        elif self._explicit_vision_mask is not None:
            vision = self._explicit_vision_mask
        else:
            raise ValueError(
                "withdrawal needs input_ids to find the vision tokens; with inputs_embeds only, give the mask "
                "explicitly: `with handle.vision_mask(mask): model(inputs_embeds=...)`"
            )
        batch, q = vision.shape
        self._attn2d = attn2d
        if past == 0:
            self._reset_generation()
            self._vision = vision
            return None
        # decode / continuation step
        if self._deep_mask2d is None or self._cache_ref is None or self._cache_ref() is not cache:
            raise RuntimeError(
                "vtw: this forward continues a KV cache that was not prefilled under this withdrawal handle; "
                "start generation from an empty cache (beam search and cache reuse are not supported)"
            )
        # New tokens in a continuation step are text: a generated id that equals a placeholder id carries no pixel
        # features (pixel inputs go with the prefill only), so it is embedded, and kept, like any other token.
        if self._deep_mask2d.shape[0] != batch:
            raise RuntimeError(
                f"vtw: batch size changed from {self._deep_mask2d.shape[0]} to {batch} during generation "
                "(beam search / batch expansion after prefill is not supported)"
            )
        new_cols = (
            attn2d[:, -q:] if attn2d is not None else torch.ones(batch, q, dtype=torch.long, device=vision.device)
        )
        self._deep_mask2d = torch.cat([self._deep_mask2d, new_cols.to(self._deep_mask2d)], dim=1)
        return None

    def _on_model_end(self, module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if self._prefill is not None and cache is not None:
            self._cache_ref = weakref.ref(cache)
        elif self._prefill is not None:
            self._deep_mask2d = None  # no cache: nothing to continue
        self._prefill = None
        self._decode_mask = None
        self._vision = None
        return None

    def _on_withdraw_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._vision is not None:  # prefill: withdraw
            return self._withdraw(module, args, kwargs, hidden)
        return self._on_deep_layer(module, args, kwargs)

    def _withdraw(self, module, args, kwargs, hidden: torch.Tensor):
        batch, length, _ = hidden.shape
        vision = self._vision
        if vision.shape != (batch, length):
            raise RuntimeError(f"vtw: vision mask {tuple(vision.shape)} does not match hidden states {(batch, length)}")
        attn2d = self._attn2d
        if attn2d is None:
            attn2d = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        attn2d = attn2d[:, -length:].to(hidden.device)
        real = attn2d.bool()
        keep = self._reducer(hidden, vision.to(hidden.device), attn2d).bool()
        keep[:, -1] |= real[:, -1]  # the last token predicts the next one: it is never withdrawn
        keep &= real  # padding carries nothing: drop it too, the packing re-pads on the left
        keep_index = packed_keep_index(keep)
        gather_index = keep_index.clamp(min=0)
        valid = keep_index >= 0
        deep2d = torch.where(valid, attn2d.gather(1, gather_index), torch.zeros_like(gather_index))
        state = _Prefill(keep_index=keep_index, gather_index=gather_index)
        state.mask4d = self._deep_mask(deep2d, deep2d.shape[1], hidden.dtype)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            state.position_embeddings = tuple(gather_tokens(t, gather_index) for t in pe)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.shape[-1] == length:
            state.position_ids = gather_positions(pos, gather_index)
        self._prefill = state
        self._deep_mask2d = deep2d
        self.last_keep_index = keep_index
        self.last_num_kept = valid.sum(1)
        new_hidden = gather_tokens(hidden, gather_index)
        args, kwargs = self._replace_layer_inputs(args, kwargs, new_hidden)
        return args, kwargs

    def _on_deep_layer(self, module, args, kwargs):
        if self._prefill is not None:
            return self._replace_layer_inputs(args, kwargs, None)
        if self._deep_mask2d is None:
            raise RuntimeError("vtw: deep layer called without a withdrawal prefill or decode state")
        if self._decode_mask is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._decode_mask = self._deep_mask(self._deep_mask2d, hidden.shape[1], hidden.dtype)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self._decode_mask
        return args, kwargs

    def _replace_layer_inputs(self, args, kwargs, new_hidden):
        state = self._prefill
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = state.mask4d
        if state.position_embeddings is not None:
            kwargs["position_embeddings"] = state.position_embeddings
        if state.position_ids is not None:
            kwargs["position_ids"] = state.position_ids
        if new_hidden is not None:
            if args:
                args = (new_hidden, *args[1:])
            else:
                kwargs["hidden_states"] = new_hidden
        return args, kwargs


def withdraw(model: nn.Module, layer: int | None, method: str | Reducer = "vtw") -> WithdrawalHandle:
    """Withdraw the vision tokens of ``model`` before decoder layer ``layer``.

    Args:
        model: a supported ``...ForConditionalGeneration`` instance (see :data:`vtw.SUPPORTED_FAMILIES`).
        layer: ``K`` in ``[0, L]``; layers ``0..K-1`` see every token, ``K..L-1`` text only. ``None`` or ``L``: no
            withdrawal (nothing is installed). ``0``: the decoder never sees vision tokens (an ablation).
        method: ``"vtw"`` (withdraw vision tokens), ``"random"`` (ablation: as many random tokens), or a reducer
            callable ``keep(hidden (B,T,D), vision_mask (B,T), attention_mask (B,T)) -> (B,T) bool``.

    Returns:
        A :class:`WithdrawalHandle`; ``handle.remove()`` (or leaving its ``with`` block) restores the model.

    Raises:
        ValueError: unsupported model, ``layer`` not ``None`` or an int in ``[0, L]``, unknown method, unsupported
            attention implementation — before anything runs.
    """
    return WithdrawalHandle(model, layer, method)


def packed_keep_index(keep: torch.Tensor) -> torch.Tensor:
    """Indices of the kept positions of each row, in order, left-padded with ``-1`` to the longest row.

    Args:
        keep: ``(B, T)`` bool.

    Returns:
        ``(B, T_out)`` long with ``T_out = max_b keep[b].sum()``.
    """
    batch, length = keep.shape
    counts = keep.sum(1)
    out_len = int(counts.max()) if batch else 0
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, then kept; each in order
    index = order[:, length - out_len :]
    valid = torch.arange(out_len, device=keep.device)[None, :] >= (out_len - counts)[:, None]
    return torch.where(valid, index, torch.full_like(index, -1))


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token axis of ``t`` (``(..., B or 1, T, D)``) with ``index`` ``(B, T_out)``."""
    lead = t.shape[:-3]
    batch, out_len = index.shape
    t = t.expand(*lead, batch, t.shape[-2], t.shape[-1])
    idx = index.to(t.device).view(*([1] * len(lead)), batch, out_len, 1).expand(*lead, batch, out_len, t.shape[-1])
    return t.gather(-2, idx)


def gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``(..., B or 1, T)`` along the token axis with ``index`` ``(B, T_out)``."""
    lead = pos.shape[:-2]
    batch, out_len = index.shape
    pos = pos.expand(*lead, batch, pos.shape[-1])
    return pos.gather(-1, index.to(pos.device).view(*([1] * len(lead)), batch, out_len).expand(*lead, batch, out_len))


def additive_causal_mask(mask2d: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + padding mask for the last ``q_len`` positions of a sequence, as an additive float mask.

    Args:
        mask2d: ``(B, KV)`` 1 for real tokens, 0 for padding (the whole key sequence, cache included).
        q_len: number of query positions (the last ``q_len`` of the ``KV`` positions).

    Returns:
        ``(B, 1, q_len, KV)``: 0 where query ``i`` may attend key ``j`` (``j <= KV - q_len + i`` and key ``j`` is
        real), the dtype's minimum elsewhere. Rows that see no key (padding queries) stay finite.
    """
    batch, kv = mask2d.shape
    q_pos = torch.arange(kv - q_len, kv, device=mask2d.device)[:, None]
    k_pos = torch.arange(kv, device=mask2d.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & mask2d.bool()[:, None, :]
    out = torch.zeros(batch, 1, q_len, kv, dtype=dtype, device=mask2d.device)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
