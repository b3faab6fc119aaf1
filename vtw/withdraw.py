"""Token reduction inside the language decoder of one model instance (VTW and its peers), with forward hooks that
:meth:`WithdrawalHandle.remove` undoes.

A method (:mod:`vtw.methods`) names its stages, decoder layers ``k_1 < k_2 < ...`` (VTW: one stage ``K`` that keeps
no vision token), and decides at each stage which tokens go on (and may merge values into them or add tokens).
Everything else is done here, for every method:

* Prefill (the cache is empty): layers ``0..k_1-1`` run on every token. A pre-hook on layer ``k_s`` asks the method
  which of the current tokens to keep (:meth:`~vtw.methods.Reduction.select`), gathers them from the hidden states,
  the rotary position embeddings and the position ids, and builds a causal + padding mask for the shorter sequence
  (:func:`pack_stage`). Samples keep different numbers of tokens, so the kept tokens of each sample are packed in
  order and left-padded to ``T_s = max_b #kept_b`` (input padding is dropped as well). The other layers of the
  segment ``k_s..k_{s+1}-1`` get the same tensors, so each segment's KV cache holds its kept tokens only.
* Decode steps (the cache is not empty): new tokens are text. Layers ``< k_1`` attend over the full cache as usual;
  the layers of segment ``s`` get a mask built from that segment's own padding mask, extended by the new tokens.
* Positions (``positions=``): ``"keep"`` (default): kept tokens keep their full-sequence positions (M-RoPE
  included) and decode steps continue from the full sequence, as the model computes them. ``"compact"``: from each
  stage on, the tokens present are renumbered ``0, 1, ...`` in order (as the PyramidDrop and VisionZip reference
  code do) and decode steps continue from each segment's own length; 1-D RoPE families only.

Output: the decoder's last hidden state and the logits cover the ``T_S`` packed positions of the last segment.
Because of the left padding the last output position is every sample's last input token, so ``generate`` (greedy,
sampling, ``logits_to_keep``) works unchanged. :attr:`WithdrawalHandle.last_stages` records what each stage kept and
:attr:`WithdrawalHandle.last_layer_tokens` the realized token counts of every layer (what FLOPs and KV follow).

Scoring a continuation (``with handle.prompt_only(last_prompt): model(prompt + continuation)``): the methods see
where each prompt ends (``StageContext.query``) and decide from the prompt alone; the continuation is always kept.

Hooks are registered on this instance's modules only (no class is patched); several models in one process can use
different methods. A method without stages (``layer=None``, or ``K = L``) registers nothing: the model is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .families import get_family, language_model, num_decoder_layers, vision_token_mask
from .methods import KeepFn, Reduction, StageContext, check_layer, make_method
from .methods.base import Extra, LayerInput, Merge
from .methods.towers import encoder_units

SUPPORTED_ATTENTION = ("eager", "sdpa")
#: what ``positions=`` accepts: kept tokens keep their positions, or are renumbered contiguously
POSITIONS = ("keep", "compact")


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


def check_positions(positions, config=None) -> str:
    """``positions`` if allowed (:data:`POSITIONS`; ``"compact"`` only on 1-D RoPE families, checked where a
    transformers ``config`` is given), else ``ValueError`` naming the value and what is allowed."""
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not allowed; allowed: {', '.join(POSITIONS)}")
    if positions == "compact" and config is not None and get_family(config).mrope:
        raise ValueError(
            f"positions=compact is not defined for {get_family(config).display}: its decoder uses 3-D multimodal "
            "RoPE positions (time, height, width), which a contiguous renumbering would discard; use positions=keep"
        )
    return positions


@dataclass(frozen=True)
class StageRecord:
    """What one stage of the last prefill passed on (:attr:`WithdrawalHandle.last_stages`).

    Attributes:
        layer: the stage's decoder layer ``k_s``.
        keep_index: ``(B, T_s)`` long, the input column of each packed token (``-1``: padding added by packing; an
            extra token carries the column of the token it follows).
        vision: ``(B, T_s)`` bool, vision tokens (extra tokens included); mask2d: ``(B, T_s)`` long, 1 at real tokens.
        extra: ``(B, T_s)`` bool, tokens a stage added (:class:`vtw.methods.base.Extra`), this one or an earlier one.
        position_ids: the position ids the segment's layers got (``(B, T_s)``; ``(3, B, T_s)`` for M-RoPE), or
            ``None`` where the decoder passed none.
        hidden: ``(B, T_s, D)`` the values layer ``k_s`` received; recorded only while
            :attr:`WithdrawalHandle.record_hidden` is True (tests and analysis), else ``None``.
    """

    layer: int
    keep_index: torch.Tensor
    vision: torch.Tensor
    mask2d: torch.Tensor
    extra: torch.Tensor
    position_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class _Segment:
    """Prefill tensors shared by the layers of one segment ``k_s..k_{s+1}-1`` during one prefill forward."""

    keep_index: torch.Tensor  # (B, T_s) long, input position of each token, -1 = padding added by packing
    mask2d: torch.Tensor  # (B, T_s) long, 1 = real token
    vision: torch.Tensor  # (B, T_s) bool
    extra: torch.Tensor  # (B, T_s) bool, tokens added by a stage
    mask4d: torch.Tensor | None = None  # (B, 1, T_s, T_s) additive float mask (None: the kernel's default)
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # recorded values (record_hidden only)

    def to(self, device: torch.device) -> _Segment:
        """This segment on ``device``: with a ``device_map``, a later stage's layer may sit on another device than
        the previous stage's (accelerate moves a layer's inputs only after these pre-hooks ran)."""

        def move(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        pe = None if self.position_embeddings is None else tuple(move(t) for t in self.position_embeddings)
        return replace(self, **{k: move(v) for k, v in vars(self).items() if k != "position_embeddings"},
                       position_embeddings=pe)  # fmt: skip

    def record(self, layer: int) -> StageRecord:
        return StageRecord(layer, self.keep_index, self.vision, self.mask2d, self.extra, self.position_ids,
                           self.hidden)  # fmt: skip

    def counts(self) -> torch.Tensor:
        """``(B, 2)`` long: real (vision, text) tokens per sample."""
        real = self.mask2d.bool()
        vision = (self.vision & real).sum(1)
        return torch.stack([vision, real.sum(1) - vision], dim=1)


@dataclass
class _Prefill:
    """The state of one prefill forward (the cache was empty), decided once when the forward starts and filled stage
    by stage.

    Attributes:
        vision: ``(B, T)`` bool, the input's vision tokens; attn2d: ``(B, T)`` its padding mask (``None``: none).
        inputs: the keyword arguments of the forward (and what ``generate``'s encoding before it was given).
        prompt_end: ``(B,)`` long input column of each sample's last prompt token (``prompt_only``), else ``None``.
        input: every input token as a segment (built at the first stage); segments: one per stage run so far.
    """

    vision: torch.Tensor
    attn2d: torch.Tensor | None
    inputs: dict
    prompt_end: torch.Tensor | None = None
    input: _Segment | None = None
    segments: list[_Segment] = field(default_factory=list)

    def input_segment(self, hidden: torch.Tensor) -> _Segment:
        """The segment of every input token, on ``hidden``'s device (``hidden``: ``(B, T, D)`` layer ``k_1``'s input)."""
        batch, length, _ = hidden.shape
        if self.vision.shape != (batch, length):
            raise RuntimeError(
                f"vtw: vision mask {tuple(self.vision.shape)} does not match hidden states {(batch, length)}"
            )
        attn2d = self.attn2d
        if attn2d is None:
            attn2d = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        columns = torch.arange(length, device=hidden.device).expand(batch, length)
        vision = self.vision.to(hidden.device)
        return _Segment(columns, attn2d[:, -length:].to(hidden.device), vision, torch.zeros_like(vision))


@dataclass
class _Generation:
    """What one generation carries across forwards: each segment's padding mask ``(B, kv_s)`` (extended by every
    decode step) and the cache it belongs to; per decode step, each segment's mask and positions, built once."""

    masks2d: list[torch.Tensor]
    cache_ref: Callable
    step: dict = field(default_factory=dict)  # segment -> (mask4d, position_embeddings, position_ids)


class _Probe:
    """A side channel: hooks (or instance attributes) that note what a method needs from outside the decoder layer
    it acts at, for the current forward. :meth:`remove` takes them all away; :meth:`clear` forgets what was noted."""

    def __init__(self) -> None:
        self.hooks: list = []

    def clear(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.clear()


class _PreviousLayer(_Probe):
    """The input of layer ``k_s - 1`` of each stage ``s`` in a prefill (FastV scores with the layer before its
    stage). Install it after the stage hooks: it then sees each layer's inputs as they replaced them."""

    def __init__(self, layers: nn.ModuleList, stages: tuple[int, ...], prefilling: Callable[[], bool],
                 projections: bool = False):  # fmt: skip
        super().__init__()
        self.seen: dict[int, LayerInput] = {}
        for s, k in enumerate(stages):
            if k >= 1:
                self.hooks.append(layers[k - 1].register_forward_pre_hook(self._hook(s, prefilling), with_kwargs=True))
                for name in ("q_proj", "k_proj") if projections else ():  # the layer's own projections, caught
                    module = getattr(layers[k - 1].self_attn, name)
                    self.hooks.append(module.register_forward_hook(self._projection(s, name, prefilling)))

    def _hook(self, s: int, prefilling):
        def hook(module, args, kwargs):
            if prefilling():
                hidden = args[0] if args else kwargs["hidden_states"]
                self.seen[s] = LayerInput(module, hidden, kwargs.get("position_embeddings"))

        return hook

    def _projection(self, s: int, name: str, prefilling):
        field_name = "queries" if name == "q_proj" else "keys"

        def hook(module, args, output):
            if prefilling() and s in self.seen:
                self.seen[s] = replace(self.seen[s], **{field_name: output})

        return hook

    def clear(self) -> None:
        self.seen = {}


class _TowerLayers(_Probe):
    """What vision tower layers received (VisionZip reads the class token's attention and the keys of the tower's
    feature layer): ``{"image" | "video": layer}`` from :meth:`~vtw.methods.Reduction.vision_layers`. The tower keeps
    its attention implementation and nothing runs twice. Images may be encoded before the prefill forward
    (``generate``), so inputs are collected until the end of the next model forward."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.layers = layers
        self.inputs: dict[str, list[torch.Tensor]] = {}
        for kind, layer in layers.items():
            self.hooks.append(layer.register_forward_pre_hook(self._hook(kind), with_kwargs=True))

    def _hook(self, kind: str):
        def hook(module, args, kwargs):
            self.inputs.setdefault(kind, []).append(args[0] if args else kwargs["hidden_states"])

        return hook

    def seen(self) -> dict:
        """``{kind: (layer, hidden (N, S, D))}``: what each layer received since the last :meth:`clear`."""
        return {k: (self.layers[k], torch.cat(v)) for k, v in self.inputs.items()}

    def clear(self) -> None:
        self.inputs = {}


class _EncoderCalls(_Probe):
    """What this instance's ``get_image_features`` / ``get_video_features`` were last given (LLaVA-NeXT's
    ``image_sizes``, Qwen's ``image_grid_thw``, the frames of ``pixel_values_videos``): methods acting before the
    decoder need each image's grid, and ``generate`` encodes images before the first forward, passing only the
    features on. The functions are wrapped by instance attributes that :meth:`remove` deletes (the class is
    untouched)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.calls: dict[str, dict] = {}
        self.current: str | None = None
        self.wrapped: list[tuple[nn.Module, str, object]] = []
        for name in ("get_image_features", "get_video_features"):
            original = getattr(base, name, None)
            if original is not None:
                wrapper = functools.update_wrapper(self._wrapper(name, original), original)
                setattr(base, name, wrapper)
                self.wrapped.append((base, name, wrapper))

    def _wrapper(self, name: str, original):
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            self.calls[name] = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
            self.current = name.split("_")[1]  # "image" | "video": what the tower is encoding now
            try:
                return original(*args, **kwargs)
            finally:
                self.current = None

        return wrapper

    def arguments(self) -> dict:
        """The tensors the wrapped functions were given since the last :meth:`clear`, by argument name."""
        return {k: v for call in self.calls.values() for k, v in call.items()}

    def clear(self) -> None:
        self.calls = {}

    def remove(self) -> None:
        for owner, name, wrapper in self.wrapped:
            if owner.__dict__.get(name) is wrapper:
                delattr(owner, name)  # the class's method shows through again
        self.wrapped.clear()
        super().remove()


class _ProjectorStage(_Probe):
    """A method acting in the vision encoder (:class:`vtw.methods.towers.InTower`): at each projector call of an
    encoder call, the method decides on the features ``(N, S, Dv)`` the projector receives; only the rows it keeps
    (merged values where it merged, plus the tokens it adds) go through the projector, and the output ``(N, S, Dm)``
    holds them at their rows (zeros at the others, which the decoder's stage 0 drops). :attr:`choices` gives the
    decisions, the added tokens projected, to stage 0."""

    def __init__(self, model: nn.Module, method: Callable, encoder: _EncoderCalls, tower: _TowerLayers):
        super().__init__()
        self.config, self.method, self.encoder, self.tower = model.config, method, encoder, tower  # method(): now
        self.choices: dict[str, list] = {}
        self.pending: tuple | None = None
        projector = get_family(model).module(model, "projector")
        self.hooks.append(projector.register_forward_pre_hook(self._before))
        self.hooks.append(projector.register_forward_hook(self._after))

    def _before(self, module, args):
        kind = self.encoder.current
        if kind is None or not args:
            return None
        if kind == "video":  # a family whose video frames the method cannot act on: stage 0 refuses them
            try:
                self.method().check_supported(self.config, video=True)
            except ValueError:
                return None
        features = args[0]  # (N, S, Dv)
        count, length, _ = features.shape
        units = encoder_units(self.config, kind, count, self.encoder.arguments())
        layer, seen = self.tower.seen()[kind]
        decided = self.method().decide(layer, seen[seen.shape[0] - count :].to(features.device), features, units)
        offset = length - (seen.shape[1] - 1)  # rows before the patches (a class token the projector receives)
        rows, values, extras = [], [], []
        for i, (patches, choice) in enumerate(zip(units, decided)):
            patches = patches.to(features.device)
            kept = patches if choice.kept is None else patches[choice.kept.to(features.device)]
            rows.append(i * length + torch.cat([torch.arange(offset, device=features.device), offset + kept]))
            head = features[i, :offset]
            values.append(torch.cat([head, features[i, offset + kept] if choice.values is None else
                                     choice.values.to(features.dtype)]))  # fmt: skip
            if choice.extra is not None:
                extras.append(choice.extra.to(features.dtype))
        packed = torch.cat([*values, *(e[None] for e in extras)])[None]  # (1, R + E, Dv)
        self.pending = (kind, features.shape, torch.cat(rows), decided)
        return (packed, *args[1:])

    def _after(self, module, args, output):
        if self.pending is None:
            return None
        (kind, (count, length, _), rows, decided), self.pending = self.pending, None
        full = output.new_zeros(count * length, output.shape[-1])
        full[rows] = output[0, : rows.numel()]
        extras = iter(output[0, rows.numel() :])
        self.choices.setdefault(kind, []).extend(
            replace(c, values=None, extra=None if c.extra is None else next(extras)) for c in decided
        )
        return full.view(count, length, -1)

    def clear(self) -> None:
        self.choices = {}


class WithdrawalHandle:
    """A reduction method installed on one model instance. Use :func:`withdraw` to create it.

    Attributes:
        method: the resolved method object (:class:`vtw.methods.Reduction`); ``label``: its label.
        layer: the first stage ``K`` (``None`` when nothing is installed); ``stages``: every stage, ``(k_1, ...)``.
        num_layers: ``L``, the number of decoder layers. positions: ``"keep"`` or ``"compact"`` (:data:`POSITIONS`).
        active: whether hooks are installed (False for ``layer=None`` and ``K = L``).
        last_stages: one :class:`StageRecord` per stage of the last prefill (``()`` before any).
        last_keep_index: ``(B, T_out)`` long tensor of the last prefill: input position of each output position,
            ``-1`` where the repacking added left padding (the last stage's ``keep_index``). ``None`` before any prefill.
        last_layer_tokens: ``(B, L, 2)`` long, the real (vision, text) tokens each decoder layer processed in the last
            prefill (realized counts; ``None`` before any prefill).
        record_hidden: set True to record each stage's values in :attr:`last_stages` (tests, analysis).
    """

    def __init__(self, model: nn.Module, method: Reduction, positions: str = "keep"):
        self.family = get_family(model)  # unsupported model: ValueError listing the supported ones
        self.num_layers = num_decoder_layers(model)
        self.method = method.resolve(self.num_layers)
        self.method.check_supported(model.config)  # a family the method cannot act on: its one-line refusal
        self.positions = check_positions(positions, model.config)
        stages = tuple(k for k in self.method.stages() if k < self.num_layers)
        if stages and not self.method.acts_on(model):  # e.g. VisionZip keeping every patch of this tower
            stages = ()
        self.stages, self.layer, self.active = stages, (stages[0] if stages else None), bool(stages)
        self.record_hidden = False
        self.last_stages: tuple[StageRecord, ...] = ()
        self.last_keep_index: torch.Tensor | None = None
        self.last_layer_tokens: torch.Tensor | None = None
        self._model_ref = weakref.ref(model)
        self._hooks: list = []
        self._probes: list[_Probe] = []
        self._previous = self._tower = self._encoder = self._projector = None
        self._explicit_vision_mask: torch.Tensor | None = None
        self._prompt_end: torch.Tensor | None = None
        self._prefill: _Prefill | None = None  # the prefill forward running now
        self._generation: _Generation | None = None  # the generation the model's cache continues
        if self.active:
            self._install(model)

    @property
    def label(self) -> str:
        """The method's label, with ``positions=compact`` where it renumbers positions."""
        return self.method.label + (" positions=compact" if self.active and self.positions == "compact" else "")

    # ------------------------------------------------------------------ public
    def remove(self) -> None:
        """Undo the reduction: remove every hook and wrapper; the model behaves exactly as before."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for probe in self._probes:
            probe.remove()
        self._probes.clear()
        self._prefill = self._generation = None

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
            f"positions={self.positions!r}, active={self.active})"
        )

    # ------------------------------------------------------------------ installation
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
        lm = language_model(model)
        self._rotary = lm.rotary_emb if self.positions == "compact" else None
        if self.method.uses_vision_layer:  # before any hook: a tower the method cannot use raises here
            self._tower = self._probe(_TowerLayers(self.method.vision_layers(model)))
        if self.method.before_decoder:
            self._encoder = self._probe(_EncoderCalls(getattr(model, "model", model)))
        if self.method.acts_in == "vision_encoder":
            self._projector = self._probe(_ProjectorStage(model, lambda: self.method, self._encoder, self._tower))
        self._hooks.append(model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._on_model_end, with_kwargs=True))
        bounds = [*self.stages, self.num_layers]
        for s, (first, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            self._hooks.append(lm.layers[first].register_forward_pre_hook(self._stage_hook(s), with_kwargs=True))
            for i in range(first + 1, stop):
                self._hooks.append(lm.layers[i].register_forward_pre_hook(self._segment_hook(s), with_kwargs=True))
        if self.method.uses_previous_layer:  # installed last: it sees each layer's inputs as replaced above
            self._previous = self._probe(_PreviousLayer(lm.layers, self.stages, lambda: self._prefill is not None,
                                                        self.method.uses_previous_projections))  # fmt: skip

    def _probe(self, probe: _Probe) -> _Probe:
        self._probes.append(probe)
        return probe

    def _stage_hook(self, s: int):
        def hook(module, args, kwargs):
            if self._prefill is not None:
                return self._reduce(s, module, args, kwargs)
            return self._decode_layer(s, args, kwargs)

        return hook

    def _segment_hook(self, s: int):
        def hook(module, args, kwargs):
            if self._prefill is not None:
                seg = self._prefill.segments[s]
                return _layer_inputs(seg.mask4d, seg.position_embeddings, seg.position_ids, args, kwargs)
            return self._decode_layer(s, args, kwargs)

        return hook

    # ------------------------------------------------------------------ one forward
    def _on_model_start(self, module, args, kwargs):
        """Decide, once per forward, whether it is a prefill (the cache is empty) or continues a generation."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        attn2d = kwargs.get("attention_mask")
        if attn2d is not None and attn2d.dim() != 2:
            raise ValueError("vtw needs a 2-D (batch, sequence) attention_mask, got shape " + str(tuple(attn2d.shape)))
        vision = self._vision_of(module.config, input_ids)
        self._prefill = None
        if cache is None or cache.get_seq_length() == 0:
            self._generation = None
            encoded = self._encoder.arguments() if self._encoder is not None else {}
            given = {k: v for k, v in kwargs.items() if v is not None}
            inputs = {**encoded, **given, "input_ids": input_ids}  # the forward's own arguments first
            self._prefill = _Prefill(vision, attn2d, inputs, self._prompt_end)
        else:
            self._continue(cache, vision, attn2d)
        return None

    def _vision_of(self, config, input_ids: torch.Tensor | None) -> torch.Tensor:
        """``(B, T)`` bool: the vision tokens of a forward's input (from its ids, or the explicit mask)."""
        explicit = self._explicit_vision_mask
        if input_ids is not None:
            vision = vision_token_mask(config, input_ids)
            return vision if explicit is None else vision | explicit.to(vision.device)
        if explicit is None:
            raise ValueError(
                "withdrawal needs input_ids to find the vision tokens; with inputs_embeds only, give the mask "
                "explicitly: `with handle.vision_mask(mask): model(inputs_embeds=...)`"
            )
        return explicit

    def _continue(self, cache, vision: torch.Tensor, attn2d: torch.Tensor | None) -> None:
        """A decode / continuation step of the generation prefilled under this handle: each segment's padding mask
        grows by the new tokens. New tokens are text: a generated id that equals a placeholder id carries no pixel
        features (pixel inputs go with the prefill only), so it is embedded, and kept, like any other token."""
        gen = self._generation
        if gen is None or gen.cache_ref() is not cache:
            raise RuntimeError(
                "vtw: this forward continues a KV cache that was not prefilled under this withdrawal handle; "
                "start generation from an empty cache (beam search and cache reuse are not supported)"
            )
        batch, q = vision.shape
        if gen.masks2d[0].shape[0] != batch:
            raise RuntimeError(
                f"vtw: batch size changed from {gen.masks2d[0].shape[0]} to {batch} during generation "
                "(beam search / batch expansion after prefill is not supported)"
            )
        new = attn2d[:, -q:] if attn2d is not None else torch.ones(batch, q, dtype=torch.long, device=vision.device)
        gen.masks2d = [torch.cat([m, new.to(m)], dim=1) for m in gen.masks2d]
        gen.step = {}

    def _on_model_end(self, module, args, kwargs, output):
        prefill, self._prefill = self._prefill, None
        for probe in self._probes:
            probe.clear()
        if prefill is None or not prefill.segments:
            return None
        self.last_stages = tuple(seg.record(k) for seg, k in zip(prefill.segments, self.stages))
        self.last_keep_index = prefill.segments[-1].keep_index
        counts = torch.empty(prefill.input.mask2d.shape[0], self.num_layers, 2, dtype=torch.long)
        bounds = [0, *self.stages, self.num_layers]
        for seg, start, stop in zip([prefill.input, *prefill.segments], bounds[:-1], bounds[1:]):
            counts[:, start:stop] = seg.counts().cpu()[:, None]
        self.last_layer_tokens = counts
        cache = getattr(output, "past_key_values", None)
        if cache is not None:  # without a cache there is nothing to continue
            self._generation = _Generation([seg.mask2d for seg in prefill.segments], weakref.ref(cache))
        return None

    # ------------------------------------------------------------------ prefill stages
    def _reduce(self, s: int, module, args, kwargs):
        """Stage ``s`` of a prefill: ask the method what to keep, pack it, and build segment ``s``'s tensors."""
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = self._prefill
        if s == 0:  # the first stage sees the model's own inputs
            prev = prefill.input = prefill.input_segment(hidden)
            pe, pos = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        else:  # a later stage continues from the previous segment's packed tokens (on this layer's device)
            prev = prefill.segments[s - 1].to(hidden.device)
            pe, pos = prev.position_embeddings, prev.position_ids
        query = _query_columns(prefill.prompt_end, prev)
        keep, values, extra = _as_merge(self.method.select(self._context(s, module, hidden, prev, kwargs, pe, query)),
                                        hidden)  # fmt: skip
        if query is not None:  # the last prompt token and the continuation after it (what is scored) all go on
            keep = keep | (torch.arange(keep.shape[1], device=keep.device)[None, :] >= query[:, None])
        seg, index, source = pack_stage(prev, keep, extra, query)
        if extra is not None:
            values = torch.cat([values, extra.hidden.to(values.device, values.dtype)], dim=1)
        new_hidden = gather_tokens(values, index.clamp(min=0))
        if self._rotary is not None:  # compact: the tokens present are renumbered 0, 1, ... in order
            seg.position_ids = compact_positions(seg.mask2d)
            seg.position_embeddings = self._rotary(new_hidden, seg.position_ids)
        else:
            seg.position_embeddings = None if pe is None else tuple(gather_tokens(t, source) for t in pe)
            if isinstance(pos, torch.Tensor) and pos.shape[-1] == hidden.shape[1]:
                seg.position_ids = gather_positions(pos, source)
        seg.mask4d = self._deep_mask(seg.mask2d, seg.mask2d.shape[1], hidden.dtype)
        seg.hidden = new_hidden if self.record_hidden else None
        prefill.segments.append(seg)
        return _layer_inputs(seg.mask4d, seg.position_embeddings, seg.position_ids, args, kwargs, new_hidden)

    def _context(self, s: int, module, hidden, prev: _Segment, kwargs, pe, query) -> StageContext:
        inputs = self._prefill.inputs
        first = self._prefill.input
        return StageContext(
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
            previous=self._previous.seen.get(s) if self._previous is not None else None,
            input_vision=(first.vision & first.mask2d.bool()).sum(1).to(hidden.device),
            inputs=inputs,
            vision_layer=self._tower.seen() if self._tower is not None else {},
            query=query,
            tower_choices=self._projector.choices if self._projector is not None else None,
        )

    # ------------------------------------------------------------------ decode steps
    def _decode_layer(self, s: int, args, kwargs):
        """A layer of segment ``s`` in a decode step: the segment's own mask (and, compact, positions)."""
        gen = self._generation
        if gen is None:
            raise RuntimeError("vtw: deep layer called without a withdrawal prefill or decode state")
        if s not in gen.step:  # built once per step, shared by the segment's layers
            hidden = args[0] if args else kwargs["hidden_states"]
            mask2d = gen.masks2d[s]
            pe = pos = None
            if self._rotary is not None:
                pos = compact_positions(mask2d)[:, -hidden.shape[1] :]
                pe = self._rotary(hidden, pos.to(hidden.device))
            gen.step[s] = (self._deep_mask(mask2d, hidden.shape[1], hidden.dtype), pe, pos)
        return _layer_inputs(*gen.step[s], args, kwargs)

    def _deep_mask(self, mask2d: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A segment's mask, or ``None`` where the attention kernel's own default is the same thing.

        Without padding, one query attends to every cached key (both kernels' behaviour without a mask), and SDPA
        runs causal for ``q_len == kv`` without a mask; skipping the mask then keeps SDPA on its fast path, as
        transformers itself does for the untouched model.
        """
        if bool(mask2d.bool().all()) and (q_len == 1 or (self._attn_impl == "sdpa" and q_len == mask2d.shape[1])):
            return None
        return additive_causal_mask(mask2d, q_len=q_len, dtype=dtype)


def _layer_inputs(mask4d, position_embeddings, position_ids, args, kwargs, hidden=None):
    """A layer's ``(args, kwargs)`` with the segment's mask, positions (where given) and hidden states (where given)."""
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = mask4d
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if hidden is not None:
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
    return args, kwargs


def _as_merge(picked, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Extra | None]:
    """What :meth:`~vtw.methods.Reduction.select` returned as ``(keep (B, T) bool, values (B, T, D), extra)``."""
    if isinstance(picked, Merge):
        values = hidden if picked.hidden is None else picked.hidden.to(hidden.device, hidden.dtype)
        return picked.keep.to(hidden.device).bool(), values, picked.extra
    return picked.to(hidden.device).bool(), hidden, None


def _query_columns(prompt_end: torch.Tensor | None, seg: _Segment) -> torch.Tensor | None:
    """``(B,)`` long: the column of each sample's last prompt token among the tokens ``seg`` holds, or ``None``
    outside :meth:`WithdrawalHandle.prompt_only` (the last column: the default)."""
    if prompt_end is None:
        return None
    end = prompt_end.to(seg.keep_index.device)
    if end.shape != (seg.keep_index.shape[0],):
        raise ValueError(f"vtw: prompt_only needs one position per sample, got shape {tuple(end.shape)}")
    hit = (seg.keep_index == end[:, None]) & seg.mask2d.bool() & ~seg.extra
    if not bool(hit.any(1).all()):  # only at stage 0: later stages keep the query token
        raise ValueError(f"vtw: prompt_only positions {end.tolist()} are not real tokens of this forward's input")
    return hit.int().argmax(1)


def withdraw(
    model: nn.Module,
    layer: int | None = None,
    method: str | Reduction | KeepFn = "vtw",
    positions: str = "keep",
    **params,
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
        positions: ``"keep"`` (kept tokens keep their positions) or ``"compact"`` (renumbered contiguously from each
            stage on, decoding continues from the compacted length; 1-D RoPE families only), :data:`POSITIONS`.
        params: the method's other parameters (e.g. ``seed=`` for ``"random"``).

    Returns:
        A :class:`WithdrawalHandle`; ``handle.remove()`` (or leaving its ``with`` block) restores the model.

    Raises:
        ValueError: unsupported model, a layer not ``None`` or an int in ``[0, L]``, unknown method or parameter,
            a family the method cannot act on (:meth:`~vtw.methods.Reduction.check_supported`), ``positions`` not
            allowed for the family, unsupported attention implementation — before anything runs.
    """
    if layer is not None:
        if isinstance(method, Reduction):
            raise ValueError(f"give the layer to the method object {method!r}, not to withdraw(layer={layer!r})")
        params["layer"] = layer
    return WithdrawalHandle(model, make_method(method, **params), positions=positions)


def pack_stage(
    prev: _Segment, keep: torch.Tensor, extra: Extra | None = None, query: torch.Tensor | None = None
) -> tuple[_Segment, torch.Tensor, torch.Tensor]:
    """The packing every method shares: what a method keeps (and the tokens it adds), plus each sample's last token
    (it predicts the next one), minus padding (it carries nothing), packed in sequence order and left-padded.

    Args:
        prev: the ``T`` tokens present before the stage; keep: ``(B, T)`` bool, the method's choice; extra: the
            tokens it adds (``E`` slots); query: ``(B,)`` column of each sample's last prompt token, or ``None``.

    Returns:
        ``(segment, index (B, T_s), source (B, T_s))``: the stage's segment (``keep_index``, ``mask2d``, ``vision``,
        ``extra``), the column of each packed token in ``T + E`` (kept tokens, then the extra slots; ``-1`` =
        padding) and the column in ``T`` whose position it takes (an extra token: the one it follows).
    """
    real = prev.mask2d.bool()
    keep = keep.bool() & real
    keep[:, -1] |= real[:, -1]
    if extra is None:
        index = packed_keep_index(keep)
        source, added = index.clamp(min=0), torch.zeros_like(index, dtype=torch.bool)
    else:
        index, source, added = _pack_with_extra(keep, real, extra, query)
    valid = index >= 0
    seg = _Segment(
        keep_index=torch.where(valid, prev.keep_index.gather(1, source), -1),
        mask2d=valid.to(prev.mask2d.dtype),
        vision=(prev.vision.gather(1, source) | added) & valid,
        extra=(prev.extra.gather(1, source) | added) & valid,
    )
    return seg, index, source


def _pack_with_extra(keep, real, extra: Extra, query) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pack_stage` with extra tokens: each follows its ``after`` column (several after one column in slot
    order); returns ``(index into T + E, source column in T, added (B, T_s) bool)``."""
    batch, length = keep.shape
    slots = extra.valid.shape[1]
    after = extra.after.to(keep.device).long()
    valid = extra.valid.to(keep.device).bool()
    last = query if query is not None else torch.full((batch,), length - 1, device=keep.device)
    bad = valid & ((after < 0) | (after >= last[:, None]) | ~real.gather(1, after.clamp(0, length - 1)))
    if bool(bad.any()):
        raise ValueError(
            f"vtw: an extra token must follow a real token before its sample's last (query) token; got after="
            f"{after[bad].tolist()} where the last columns are {last.tolist()}"
        )
    step = slots + 1
    key = torch.cat([torch.arange(length, device=keep.device).expand(batch, length) * step,
                     after * step + 1 + torch.arange(slots, device=keep.device)], dim=1)  # fmt: skip
    index = pack_order(torch.cat([keep, valid], dim=1), key)
    added = index >= length
    source = torch.where(added, after.gather(1, (index - length).clamp(0, max(slots - 1, 0))), index)
    return index, source.clamp(min=0), added


def pack_kept(keep: torch.Tensor, mask2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_stage` of a plain keep mask over input tokens.

    Args:
        keep: ``(B, T)`` bool, the method's choice; mask2d: ``(B, T)`` 1 at real tokens, 0 at padding.

    Returns:
        ``(index (B, T_out), mask2d (B, T_out))``: the position in ``T`` of each packed token (``-1`` = padding) and
        the packed padding mask.
    """
    batch, length = keep.shape
    columns = torch.arange(length, device=keep.device).expand(batch, length)
    zeros = torch.zeros_like(keep, dtype=torch.bool)
    seg, index, _ = pack_stage(_Segment(columns, mask2d, zeros, zeros), keep)
    return index, seg.mask2d


def pack_order(keep: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The kept entries of each row by ascending ``key``, left-padded with ``-1`` to the longest row.

    Args:
        keep: ``(B, N)`` bool; key: ``(B, N)`` long, the sequence order (distinct within a row).

    Returns:
        ``(B, N_out)`` long, columns of ``N``, with ``N_out = max_b keep[b].sum()``.
    """
    batch = keep.shape[0]
    counts = keep.sum(1)
    out_len = int(counts.max()) if batch else 0
    beyond = key.max() + 1 if key.numel() else 0
    order = torch.argsort(torch.where(keep, key, beyond), dim=1, stable=True)[:, :out_len]  # kept first, in order
    col = torch.arange(out_len, device=keep.device)[None, :] - (out_len - counts)[:, None]
    return torch.where(col >= 0, order.gather(1, col.clamp(min=0)), torch.full_like(col, -1))


def packed_keep_index(keep: torch.Tensor) -> torch.Tensor:
    """Indices of the kept positions of each row, in order, left-padded with ``-1`` to the longest row.

    Args:
        keep: ``(B, T)`` bool.

    Returns:
        ``(B, T_out)`` long with ``T_out = max_b keep[b].sum()``.
    """
    batch, length = keep.shape
    return pack_order(keep, torch.arange(length, device=keep.device).expand(batch, length))


def compact_positions(mask2d: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` long: each real token's rank among the real tokens of its row (``0, 1, ...``; padding: 0), the
    positions of ``positions="compact"`` (as the model numbers a left-padded input)."""
    return (mask2d.long().cumsum(1) - 1).clamp(min=0)


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
