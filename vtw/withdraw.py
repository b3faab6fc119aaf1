"""Token reduction inside the language decoder of one model instance (VTW and its peers), with forward hooks that
:meth:`WithdrawalHandle.remove` undoes.

A method (:mod:`vtw.methods`) names its stages, decoder layers ``k_1 < k_2 < ...`` (VTW: one stage ``K`` that keeps
no vision token), and decides at each stage which tokens go on. Everything else is done here, for every method:

* Prefill (the cache is empty): layers ``0..k_1-1`` run on every token. A pre-hook on layer ``k_s`` asks the method
  which of the current tokens to keep, gathers them from the hidden states, the rotary position embeddings (so kept
  tokens keep their full-sequence positions, M-RoPE included) and the position ids, and builds a causal + padding
  mask for the shorter sequence. Samples keep different numbers of tokens, so the kept tokens of each sample are
  packed in order and left-padded to ``T_s = max_b #kept_b`` (input padding is dropped as well). The other layers of
  the segment ``k_s..k_{s+1}-1`` get the same tensors, so each segment's KV cache holds its kept tokens only.
* Decode steps (the cache is not empty): new tokens are text. Layers ``< k_1`` attend over the full cache as usual;
  the layers of segment ``s`` get a mask built from that segment's own padding mask, extended by the new tokens.
  Positions come from the model as usual (the full-sequence length, held by layer 0's cache), so they continue from
  the full sequence.

Output: the decoder's last hidden state and the logits cover the ``T_S`` packed positions of the last segment.
Because of the left padding the last output position is every sample's last input token, so ``generate`` (greedy,
sampling, ``logits_to_keep``) works unchanged. :attr:`WithdrawalHandle.last_keep_index` maps output positions back
to input positions.

Scoring a continuation (``with handle.prompt_only(last_prompt): model(prompt + continuation)``): the methods see
where each prompt ends (``StageContext.query``) and decide from the prompt alone; the continuation is always kept.

Hooks are registered on this instance's modules only (no class is patched); several models in one process can use
different methods. A method without stages (``layer=None``, or ``K = L``) registers nothing: the model is untouched.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .families import get_family, language_model, num_decoder_layers, vision_token_mask
from .methods import KeepFn, Reduction, StageContext, check_layer, make_method
from .methods.base import LayerInput, Merge

SUPPORTED_ATTENTION = ("eager", "sdpa")


def validate_layer(layer, num_layers: int) -> int | None:
    """Check a withdrawal layer: ``None`` or an int in ``[0, num_layers]``; returns it, else ``ValueError``."""
    return check_layer(layer, num_layers)


def check_attention(impl, what: str = "attention implementation") -> str:
    """``impl`` if vtw supports it (:data:`SUPPORTED_ATTENTION`), else ``ValueError`` naming it and the allowed ones."""
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{what} {impl!r} is not supported by vtw; load the model with attn_implementation in {SUPPORTED_ATTENTION}"
        )
    return impl


@dataclass
class _Segment:
    """Prefill tensors shared by the layers of one segment ``k_s..k_{s+1}-1`` during one prefill forward."""

    keep_index: torch.Tensor  # (B, T_s) long, input position of each token, -1 = padding added by packing
    mask2d: torch.Tensor  # (B, T_s) long, 1 = real token
    vision: torch.Tensor  # (B, T_s) bool
    mask4d: torch.Tensor | None = None  # (B, 1, T_s, T_s) additive float mask (None: the kernel's default)
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None


def _to_device(seg: _Segment, device: torch.device) -> _Segment:
    """``seg``'s tensors on ``device``: with a ``device_map``, a later stage's layer may sit on another device than
    the previous stage's (accelerate moves a layer's inputs only after these pre-hooks ran)."""

    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    pe = None if seg.position_embeddings is None else tuple(move(t) for t in seg.position_embeddings)
    return _Segment(
        move(seg.keep_index), move(seg.mask2d), move(seg.vision), move(seg.mask4d), pe, move(seg.position_ids)
    )


class WithdrawalHandle:
    """A reduction method installed on one model instance. Use :func:`withdraw` to create it.

    Attributes:
        method: the resolved method object (:class:`vtw.methods.Reduction`); ``label``: its label.
        layer: the first stage ``K`` (``None`` when nothing is installed); ``stages``: every stage, ``(k_1, ...)``.
        num_layers: ``L``, the number of decoder layers.
        active: whether hooks are installed (False for ``layer=None`` and ``K = L``).
        last_keep_index: ``(B, T_out)`` long tensor of the last prefill: input position of each output position,
            ``-1`` where the repacking added left padding. ``None`` before any prefill.
    """

    def __init__(self, model: nn.Module, method: Reduction):
        self.family = get_family(model)  # unsupported model: ValueError listing the supported ones
        self.num_layers = num_decoder_layers(model)
        self.method = method.resolve(self.num_layers)
        self.method.check_supported(model.config)  # a family the method cannot act on: its one-line refusal
        self.stages = tuple(k for k in self.method.stages() if k < self.num_layers)
        if self.stages and not self.method.acts_on(model):  # e.g. VisionZip keeping every patch of this tower
            self.stages = ()
        self.layer = self.stages[0] if self.stages else None
        self._model_ref = weakref.ref(model)
        self._hooks: list = []
        self._explicit_vision_mask: torch.Tensor | None = None
        self._prompt_end: torch.Tensor | None = None  # (B,) input position of each sample's last prompt token
        self.last_keep_index: torch.Tensor | None = None
        # per-forward state
        self._vision: torch.Tensor | None = None  # (B, T) vision mask of the current prefill
        self._attn2d: torch.Tensor | None = None  # (B, T_full) 2-D padding mask passed to the current forward
        self._segments: list[_Segment] | None = None  # the current prefill's segments, built stage by stage
        self._previous: dict[int, LayerInput] = {}  # stage -> input of layer k_s - 1 (methods that ask for it)
        self._input_vision: torch.Tensor | None = None  # (B,) vision tokens per sample of the current prefill
        self._inputs: dict | None = None  # keyword arguments of the current prefill forward
        self._encoder_inputs: dict[str, dict] = {}  # feature method -> the tensors its last call was given
        self._wrapped: list[tuple[nn.Module, str, object]] = []
        self._vision_layers: dict[str, nn.Module] = {}  # methods with uses_vision_layer: "image"/"video" -> layer
        self._vision_layer_inputs: dict[str, list[torch.Tensor]] = {}  # what they received since the last forward
        self._decode_masks: dict[int, torch.Tensor | None] = {}  # segment -> (B, 1, q, kv_s), current decode step
        # across forwards of one generation: each segment's padding mask and the cache it belongs to
        self._deep_masks2d: list[torch.Tensor] | None = None  # [(B, kv_s)] per segment
        self._cache_ref = None
        self.active = bool(self.stages)
        if self.active:
            self._install(model)

    @property
    def label(self) -> str:
        return self.method.label

    # ------------------------------------------------------------------ public
    def remove(self) -> None:
        """Undo the reduction: remove every hook; the model behaves exactly as before."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for owner, name, wrapper in self._wrapped:
            if owner.__dict__.get(name) is wrapper:
                delattr(owner, name)  # the class's method shows through again
        self._wrapped.clear()
        self._vision_layer_inputs = {}
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

    @contextlib.contextmanager
    def prompt_only(self, last_prompt: torch.Tensor) -> Iterator[None]:
        """Forwards whose input is prompt + continuation, where the continuation's log-probs are read (an lmms-eval
        ``loglikelihood`` request): the methods decide from the prompt alone, so every continuation of one prompt
        sees the same kept tokens, those the prompt alone gets. Methods that rank (FastV, PyramidDrop) rank by the
        last prompt token's attention (keys after it masked out); ``random`` draws over the prompt; the last prompt
        token and every token after it always go on. Prefill forwards only (decode steps are unaffected).

        Args:
            last_prompt: ``(B,)`` long, the input position (in the left-padded ``T`` of the forward's ``input_ids``)
                of each sample's last prompt token; ``T - 1`` for a sample without continuation.
        """
        self._prompt_end = torch.as_tensor(last_prompt, dtype=torch.long)
        try:
            yield
        finally:
            self._prompt_end = None

    def __repr__(self) -> str:
        return (
            f"WithdrawalHandle({self.method!r}, stages={self.stages}, num_layers={self.num_layers}, "
            f"active={self.active})"
        )

    # ------------------------------------------------------------------ hooks
    def _install(self, model: nn.Module) -> None:
        cfg = model.config.get_text_config()
        impl = getattr(cfg, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
        self._attn_impl = check_attention(impl)
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types[self.layer :]):
            raise ValueError(
                f"layers {self.layer}..{self.num_layers - 1} include non-full attention ({sorted(set(layer_types))}); "
                "vtw supports full-attention decoders only"
            )
        layers = language_model(model).layers
        if self.method.uses_vision_layer:  # before any hook: a tower the method cannot use raises here
            self._capture_vision_layers(model)
        if self.method.before_decoder:
            self._record_encoder_inputs(getattr(model, "model", model))
        self._hooks.append(model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._on_model_end, with_kwargs=True))
        bounds = [*self.stages, self.num_layers]
        for s, (first, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            self._hooks.append(layers[first].register_forward_pre_hook(self._stage_hook(s), with_kwargs=True))
            for i in range(first + 1, stop):
                self._hooks.append(layers[i].register_forward_pre_hook(self._segment_hook(s), with_kwargs=True))
        if self.method.uses_previous_layer:  # registered last: they see each layer's inputs as replaced above
            for s, k in enumerate(self.stages):
                if k >= 1:
                    self._hooks.append(layers[k - 1].register_forward_pre_hook(self._capture(s), with_kwargs=True))

    def _record_encoder_inputs(self, base: nn.Module) -> None:
        """Methods acting before the decoder need each image's grid (LLaVA-NeXT's ``image_sizes``, Qwen's
        ``image_grid_thw``, the frames of ``pixel_values_videos``). ``generate`` encodes images before the first
        forward and passes only the features on, so this instance's ``get_image_features`` / ``get_video_features``
        are wrapped (an instance attribute that :meth:`remove` deletes; the class is untouched) to note what they
        were given."""
        import functools
        import inspect

        for name in ("get_image_features", "get_video_features"):
            original = getattr(base, name, None)
            if original is None:
                continue
            signature = inspect.signature(original)

            def wrapper(*args, _original=original, _signature=signature, _name=name, **kwargs):
                bound = _signature.bind_partial(*args, **kwargs).arguments
                self._encoder_inputs[_name] = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
                return _original(*args, **kwargs)

            functools.update_wrapper(wrapper, original)
            setattr(base, name, wrapper)
            self._wrapped.append((base, name, wrapper))

    def _capture_vision_layers(self, model: nn.Module) -> None:
        """Methods that read a vision tower layer (VisionZip: the class token's attention and the keys of the feature
        layer) get its inputs from a forward pre-hook on that layer (of each tower, :meth:`Reduction.vision_layers`):
        the tower keeps its attention implementation and nothing runs twice. The images may be encoded before the
        prefill forward (``generate``), so inputs are collected until the end of the next model forward."""
        self._vision_layers = self.method.vision_layers(model)
        for kind, layer in self._vision_layers.items():

            def hook(module, args, kwargs, _kind=kind):
                hidden = args[0] if args else kwargs["hidden_states"]
                self._vision_layer_inputs.setdefault(_kind, []).append(hidden)

            self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def _stage_hook(self, s: int):
        def hook(module, args, kwargs):
            if self._vision is not None:  # prefill: reduce
                return self._reduce(s, module, args, kwargs)
            return self._on_segment_layer(s, args, kwargs)

        return hook

    def _capture(self, s: int):
        def hook(module, args, kwargs):
            if self._vision is not None:  # prefill only
                hidden = args[0] if args else kwargs["hidden_states"]
                self._previous[s] = LayerInput(module, hidden, kwargs.get("position_embeddings"))

        return hook

    def _segment_hook(self, s: int):
        return lambda module, args, kwargs: self._on_segment_layer(s, args, kwargs)

    def _reset_generation(self) -> None:
        self._deep_masks2d = None
        self._cache_ref = None
        self._segments = None
        self._decode_masks = {}
        self._vision = None

    def _deep_mask(self, mask2d: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A segment's mask, or ``None`` where the attention kernel's own default is the same thing.

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
        self._segments = None
        self._decode_masks = {}
        self._previous = {}
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
            # the forward's own arguments first; what generate's encoding before the forward was given fills the rest
            encoded = {k: v for call in self._encoder_inputs.values() for k, v in call.items()}
            given = {k: v for k, v in kwargs.items() if v is not None}
            self._inputs = {**encoded, **given, "input_ids": input_ids}
            return None
        # decode / continuation step
        if self._deep_masks2d is None or self._cache_ref is None or self._cache_ref() is not cache:
            raise RuntimeError(
                "vtw: this forward continues a KV cache that was not prefilled under this withdrawal handle; "
                "start generation from an empty cache (beam search and cache reuse are not supported)"
            )
        # New tokens in a continuation step are text: a generated id that equals a placeholder id carries no pixel
        # features (pixel inputs go with the prefill only), so it is embedded, and kept, like any other token.
        if self._deep_masks2d[0].shape[0] != batch:
            raise RuntimeError(
                f"vtw: batch size changed from {self._deep_masks2d[0].shape[0]} to {batch} during generation "
                "(beam search / batch expansion after prefill is not supported)"
            )
        new_cols = (
            attn2d[:, -q:] if attn2d is not None else torch.ones(batch, q, dtype=torch.long, device=vision.device)
        )
        self._deep_masks2d = [torch.cat([m, new_cols.to(m)], dim=1) for m in self._deep_masks2d]
        return None

    def _on_model_end(self, module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if self._segments is not None and cache is not None:
            self._cache_ref = weakref.ref(cache)
        elif self._segments is not None:
            self._deep_masks2d = None  # no cache: nothing to continue
        self._segments = None
        self._decode_masks = {}
        self._previous = {}
        self._vision = None
        self._inputs = None
        self._encoder_inputs = {}
        self._vision_layer_inputs = {}
        return None

    def _stage_input(self, s: int, hidden: torch.Tensor, kwargs) -> tuple[_Segment, tuple | None, object]:
        """What stage ``s`` acts on: the tokens present (a :class:`_Segment`), their position embeddings and ids.

        Args:
            hidden: ``(B, T, D)`` the input hidden states of layer ``k_s``; kwargs: that layer's keyword arguments.
        """
        batch, length, _ = hidden.shape
        if s:  # a later stage continues from the previous segment's packed tokens (on this layer's device)
            prev = _to_device(self._segments[s - 1], hidden.device)
            return prev, prev.position_embeddings, prev.position_ids
        vision = self._vision  # the first stage sees the model's own inputs
        if vision.shape != (batch, length):
            raise RuntimeError(f"vtw: vision mask {tuple(vision.shape)} does not match hidden states {(batch, length)}")
        attn2d = self._attn2d
        if attn2d is None:
            attn2d = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        attn2d = attn2d[:, -length:].to(hidden.device)
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        prev = _Segment(keep_index=positions, mask2d=attn2d, vision=vision.to(hidden.device))
        self._segments = []
        self._input_vision = (prev.vision & attn2d.bool()).sum(1)
        return prev, kwargs.get("position_embeddings"), kwargs.get("position_ids")

    def _query_columns(self, seg: _Segment) -> torch.Tensor | None:
        """``(B,)`` long: the column of each sample's last prompt token among the tokens ``seg`` holds, or ``None``
        outside :meth:`prompt_only` (the last column: the default)."""
        if self._prompt_end is None:
            return None
        end = self._prompt_end.to(seg.keep_index.device)
        if end.shape != (seg.keep_index.shape[0],):
            raise ValueError(f"vtw: prompt_only needs one position per sample, got shape {tuple(end.shape)}")
        hit = (seg.keep_index == end[:, None]) & seg.mask2d.bool()
        if not bool(hit.any(1).all()):  # only at stage 0: later stages keep the query token
            raise ValueError(f"vtw: prompt_only positions {end.tolist()} are not real tokens of this forward's input")
        return hit.int().argmax(1)

    def _reduce(self, s: int, module, args, kwargs):
        """Stage ``s`` of a prefill: ask the method what to keep, pack it, and build segment ``s``'s tensors."""
        hidden = args[0] if args else kwargs["hidden_states"]
        length = hidden.shape[1]
        prev, pe, pos = self._stage_input(s, hidden, kwargs)
        query = self._query_columns(prev)
        ctx = StageContext(
            stage=s,
            layer=self.stages[s],
            hidden=hidden,
            vision=prev.vision,
            attention_mask=prev.mask2d,
            positions=prev.keep_index,
            module=module,
            model=self._model_ref(),
            layer_kwargs=kwargs,
            position_embeddings=pe,
            previous=self._previous.get(s),
            input_vision=self._input_vision.to(hidden.device),
            inputs=self._inputs,
            vision_layer={k: (self._vision_layers[k], torch.cat(v)) for k, v in self._vision_layer_inputs.items()},
            query=query,
        )
        picked = self.method.select(ctx)
        if isinstance(picked, Merge):  # kept tokens carry new values
            picked, hidden = picked.keep, picked.hidden.to(hidden.device, hidden.dtype)
        picked = picked.to(hidden.device)
        if query is not None:  # the last prompt token and the continuation after it (what is scored) all go on
            picked = picked.bool() | (torch.arange(length, device=hidden.device)[None, :] >= query[:, None])
        local, mask2d = pack_kept(picked, prev.mask2d)
        gather_index = local.clamp(min=0)
        valid = local >= 0
        seg = _Segment(
            keep_index=torch.where(valid, prev.keep_index.gather(1, gather_index), -1),
            mask2d=mask2d,
            vision=prev.vision.gather(1, gather_index) & valid,
        )
        seg.mask4d = self._deep_mask(mask2d, mask2d.shape[1], hidden.dtype)
        if pe is not None:
            seg.position_embeddings = tuple(gather_tokens(t, gather_index) for t in pe)
        if isinstance(pos, torch.Tensor) and pos.shape[-1] == length:
            seg.position_ids = gather_positions(pos, gather_index)
        self._segments.append(seg)
        if s == 0:
            self._deep_masks2d = []
        self._deep_masks2d.append(mask2d)
        self.last_keep_index = seg.keep_index
        new_hidden = gather_tokens(hidden, gather_index)
        return self._replace_layer_inputs(seg, args, kwargs, new_hidden)

    def _on_segment_layer(self, s: int, args, kwargs):
        if self._segments is not None:
            return self._replace_layer_inputs(self._segments[s], args, kwargs, None)
        if self._deep_masks2d is None:
            raise RuntimeError("vtw: deep layer called without a withdrawal prefill or decode state")
        if s not in self._decode_masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._decode_masks[s] = self._deep_mask(self._deep_masks2d[s], hidden.shape[1], hidden.dtype)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self._decode_masks[s]
        return args, kwargs

    @staticmethod
    def _replace_layer_inputs(seg: _Segment, args, kwargs, new_hidden):
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = seg.mask4d
        if seg.position_embeddings is not None:
            kwargs["position_embeddings"] = seg.position_embeddings
        if seg.position_ids is not None:
            kwargs["position_ids"] = seg.position_ids
        if new_hidden is not None:
            if args:
                args = (new_hidden, *args[1:])
            else:
                kwargs["hidden_states"] = new_hidden
        return args, kwargs


def withdraw(
    model: nn.Module, layer: int | None = None, method: str | Reduction | KeepFn = "vtw", **params
) -> WithdrawalHandle:
    """Reduce the vision tokens of ``model`` inside its language decoder; by default VTW before layer ``layer``.

    Args:
        model: a supported ``...ForConditionalGeneration`` instance (see :data:`vtw.SUPPORTED_FAMILIES`).
        layer: ``K`` in ``[0, L]``: the method's layer (VTW: layers ``0..K-1`` see every token, ``K..L-1`` text
            only). ``None`` or ``L``: no withdrawal (nothing is installed). ``0``: the decoder never sees vision
            tokens (an ablation). Methods with several stages take ``layers=`` instead.
        method: a name from :data:`vtw.methods.METHODS` (``"vtw"``; ``"random"``: the paper's ablation, as many
            random tokens), a method object (:class:`vtw.methods.Reduction`), or a callable
            ``keep(hidden (B,T,D), vision_mask (B,T), attention_mask (B,T)) -> (B,T) bool`` applied at ``layer``.
        params: the method's other parameters (e.g. ``seed=`` for ``"random"``).

    Returns:
        A :class:`WithdrawalHandle`; ``handle.remove()`` (or leaving its ``with`` block) restores the model.

    Raises:
        ValueError: unsupported model, a layer not ``None`` or an int in ``[0, L]``, unknown method or parameter,
            a family the method cannot act on (:meth:`~vtw.methods.Reduction.check_supported`), unsupported
            attention implementation — before anything runs.
    """
    if layer is not None:
        if isinstance(method, Reduction):
            raise ValueError(f"give the layer to the method object {method!r}, not to withdraw(layer={layer!r})")
        params["layer"] = layer
    return WithdrawalHandle(model, make_method(method, **params))


def pack_kept(keep: torch.Tensor, mask2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packing every method shares: what a method keeps, plus each sample's last token (it predicts the next
    one), minus padding (it carries nothing), packed in order and left-padded.

    Args:
        keep: ``(B, T)`` bool, the method's choice; mask2d: ``(B, T)`` 1 at real tokens, 0 at padding.

    Returns:
        ``(index (B, T_out), mask2d (B, T_out))``: the position in ``T`` of each packed token (``-1`` = padding) and
        the packed padding mask.
    """
    real = mask2d.bool()
    keep = keep.bool().clone()
    keep[:, -1] |= real[:, -1]
    keep &= real
    index = packed_keep_index(keep)
    packed = torch.where(index >= 0, mask2d.gather(1, index.clamp(min=0)), torch.zeros_like(index))
    return index, packed


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
