"""What every reduction method is: a small frozen dataclass that validates its parameters and answers the questions
the layers above ask (where it acts, what it keeps, how many tokens each layer sees, its label).

The mechanism that applies a method to a model (:mod:`vtw.withdraw`) is shared: at each of the method's *stages*
(decoder layers ``k_1 < k_2 < ...``) it asks :meth:`Reduction.select` which of the current tokens go on, then packs
them (kept tokens keep their positions), builds per-layer masks, keeps the deep layers' KV cache consistent with
what they saw, and continues decode steps on the reduced cache. A method only decides; it never touches the model.

Lifecycle: ``Method(**params)`` checks what can be checked without a model (types, ranges); ``resolve(num_layers)``
checks the layers against the decoder's ``L`` and fills layer defaults that depend on ``L``; every other question is
asked of the resolved method.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class StageContext:
    """What a method sees at one stage of a prefill (decode steps never call :meth:`Reduction.select`).

    Attributes:
        stage: index of this stage in :meth:`Reduction.stages`.
        layer: the decoder layer the stage acts before: layers ``>= layer`` see only the kept tokens.
        hidden: ``(B, T, D)`` input hidden states of ``layer`` (``T``: the tokens still present, left-padded).
        vision: ``(B, T)`` bool, True at vision tokens.
        attention_mask: ``(B, T)`` long, 1 at real tokens, 0 at padding.
        positions: ``(B, T)`` long, the input position of each token (``-1`` at padding added by packing).
        module: the decoder layer module ``layer``; ``model``: the whole model (``None`` in tests of a method alone).
        layer_kwargs: the keyword arguments of the call of ``layer`` as the decoder made it (full-length tensors).
        position_embeddings: ``(cos, sin)`` of these ``T`` tokens (their own positions), as ``layer`` will get them.
        previous: for methods with ``uses_previous_layer``, the input of layer ``layer - 1`` on these same tokens
            (``None`` at layer 0).
        input_vision: ``(B,)`` long, each sample's number of vision tokens in the input (before any stage).
        inputs: the keyword arguments of the model's prefill forward (``input_ids`` ``(B, T)``, ``image_sizes``,
            ``image_grid_thw``, ``pixel_values_videos``, ...): where the methods acting before the decoder read each
            image's and video's grid (:func:`vtw.grids.input_layouts`).
        vision_layer: for methods with ``uses_vision_layer``, ``{"image" | "video": (layer, hidden)}``: the vision
            tower layer :meth:`Reduction.vision_layers` named and ``hidden`` ``(N, S, D)``, what it received for the
            ``N`` encoder inputs of this prefill (images, or video frames, in batch order).
        query: ``(B,)`` long, the column in ``T`` of each sample's last *prompt* token, where the input is prompt +
            continuation and the continuation is scored (:meth:`vtw.WithdrawalHandle.prompt_only`); ``None``: the
            last column, the last input token (:meth:`query_or_last` gives either as a tensor). A method that looks
            at text decides from columns ``<= query`` only (FastV and PyramidDrop rank by the query's attention,
            ``random`` draws before it), so every continuation of a prompt gets what the prompt alone gets; the
            columns from ``query`` on are kept whatever :meth:`Reduction.select` returns.
        tower_choices: for methods acting in the vision encoder, ``{"image" | "video": [UnitChoice, ...]}``: what
            the method decided for each tower input encoded for this prefill, in encoding order, the added tokens
            projected (:class:`vtw.methods.towers.UnitChoice`).
    """

    stage: int
    layer: int
    hidden: torch.Tensor
    vision: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    module: nn.Module | None = None
    model: nn.Module | None = None
    layer_kwargs: dict | None = None
    position_embeddings: tuple | None = None
    previous: LayerInput | None = None
    input_vision: torch.Tensor | None = None
    inputs: dict | None = None
    vision_layer: dict | None = None
    query: torch.Tensor | None = None
    tower_choices: dict | None = None

    def query_or_last(self) -> torch.Tensor:
        """``(B,)`` long: :attr:`query`, or ``T - 1`` for every sample where it is ``None``."""
        if self.query is not None:
            return self.query
        batch, length = self.vision.shape
        return torch.full((batch,), length - 1, dtype=torch.long, device=self.vision.device)


@dataclass(frozen=True)
class Extra:
    """New tokens a stage adds to the sequence (e.g. pruned tokens recycled into a few aggregates).

    Attributes:
        hidden: ``(B, E, D)`` their values.
        valid: ``(B, E)`` bool, the real slots (samples may add different numbers of tokens).
        after: ``(B, E)`` long, the column of the stage's ``T`` tokens each one follows in sequence order (several
            after one column keep their ``E`` order). An extra token takes that column's position (position ids and
            rotary embedding, as the kept tokens keep theirs), counts as a vision token (a later stage may drop it;
            the KV cache of the layers after the stage holds it), and must follow a real token before the last
            (query) one, which stays last.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    after: torch.Tensor


@dataclass(frozen=True)
class Merge:
    """What :meth:`Reduction.select` returns when kept tokens carry new values or tokens are added.

    Attributes:
        keep: ``(B, T)`` bool, the tokens that go on.
        hidden: ``(B, T, D)``, the hidden states to take the kept tokens' values from (the others are ignored);
            ``None``: kept tokens keep their values.
        extra: tokens added after the kept ones they follow (:class:`Extra`), or ``None``.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    extra: Extra | None = None


@dataclass(frozen=True)
class LayerInput:
    """What one decoder layer received in a prefill: the layer, ``hidden`` ``(B, T, D)`` and ``position_embeddings``
    ``(cos, sin)`` of the same ``T`` tokens; for methods with ``uses_previous_projections``, the layer's own query
    and key projections of them, ``queries`` ``(B, T, H·hd)`` and ``keys`` ``(B, T, KV·hd)`` (``q_proj`` / ``k_proj``
    outputs as the layer computed them, before the rotary embedding), so a method scores without projecting again."""

    module: nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple | None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def projected(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(queries, keys)`` where both were caught, else ``None``."""
        return None if self.queries is None or self.keys is None else (self.queries, self.keys)


def check_layer(layer, num_layers: int, what: str = "withdrawal layer") -> int | None:
    """``None`` or an int in ``[0, num_layers]``; returns it, else ``ValueError`` naming the value and the range."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"{what} must be an integer in [0, {num_layers}] or None, got {layer!r} ({type(layer).__name__})"
        )
    if not 0 <= layer <= num_layers:
        raise ValueError(f"{what} {layer} is out of range: allowed 0..{num_layers} (L={num_layers}) or None")
    return layer


def check_stage_layers(layers, keep: tuple, what: str) -> tuple[int, ...] | None:
    """``None``, or ``layers`` (an int or a list) as a strictly increasing tuple of ints with one entry per ``keep``
    share; else ``ValueError`` naming the value (``what``: the method, e.g. ``"pdrop"``)."""
    if layers is None:
        return None
    out = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
    if any(isinstance(k, bool) or not isinstance(k, int) for k in out):
        raise ValueError(f"{what} layers must be integers, got {layers!r}")
    if len(out) != len(keep):
        raise ValueError(
            f"{what} layers {list(out)} and keep {list(keep)} must have the same length (one share per stage)"
        )
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{what} layers must be strictly increasing, got {list(out)}")
    return out


def scaled_layers(reference: tuple[int, ...], keep: tuple, num_layers: int, what: str) -> tuple[int, ...]:
    """A paper's stage layers ``reference`` of a 32-layer decoder scaled to ``L`` (``round(k·L/32)``), for ``keep``
    (one share per stage); ``ValueError`` where the counts differ or the scaled layers collide."""
    if len(keep) != len(reference):
        raise ValueError(
            f"{what} with {len(keep)} keep shares needs its layers (the default layers are for {len(reference)} stages)"
        )
    layers = tuple(round(k * num_layers / 32) for k in reference)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{what}: the default layers do not fit L={num_layers}; give layers=... explicitly")
    return layers


def check_int(value, what: str, minimum: int = 0) -> int:
    """An int (not a bool) ``>= minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Reduction:
    """Base of every method. Subclasses are frozen dataclasses with a class attribute :attr:`name` (the registry
    key, ``vtw.method=<name>``) and override :meth:`stages`, :meth:`select` and :meth:`stage_tokens`."""

    name: ClassVar[str] = ""
    #: whether :data:`vtw.methods.METHODS` lists it (a method chosen by name in config and model args)
    registered: ClassVar[bool] = True
    #: whether :meth:`select` needs the input of the layer before each stage (``StageContext.previous``)
    uses_previous_layer: ClassVar[bool] = False
    #: whether :meth:`select` also needs that layer's query and key projections (``LayerInput.queries`` / ``keys``)
    uses_previous_projections: ClassVar[bool] = False
    #: whether :meth:`select` needs the input of a vision tower layer (``StageContext.vision_layer``)
    uses_vision_layer: ClassVar[bool] = False
    #: where the method removes tokens: ``"decoder"`` (before decoder layers, :meth:`stages`), ``"projector"``
    #: (between the projector and the decoder: each image's and video's projected tokens, one stage at layer 0) or
    #: ``"vision_encoder"`` (on the features the projector receives, which then projects the kept tokens only:
    #: :class:`vtw.methods.towers.InTower`; the decoder's stage 0 drops the others); what it reads to decide is
    #: declared by :attr:`uses_previous_layer` / :attr:`uses_vision_layer`
    acts_in: ClassVar[str] = "decoder"
    #: whether the tokens a stage keeps depend on the data (SparseVLM's rank-based counts, PruMerge's outliers):
    #: :meth:`stage_tokens` then gives the expected counts, and a run's realized counts differ from them; read it on
    #: an instance (a method whose parameters decide it overrides it with a property: DyCoke's ``threshold``)
    counts_depend_on_data: ClassVar[bool] = False

    def resolve(self, num_layers: int) -> Reduction:
        """This method checked against a decoder of ``num_layers`` layers, with ``L``-dependent defaults filled in.

        Raises:
            ValueError: a layer out of range, naming it and the allowed range.
        """
        return self

    def stages(self) -> tuple[int, ...]:
        """The layers ``k_1 < k_2 < ...`` before which the method reduces (of a resolved method); ``()``: none,
        the model runs untouched. A stage at ``L`` (after the last layer) does nothing."""
        raise NotImplementedError

    @property
    def before_decoder(self) -> bool:
        """Whether the method acts before the decoder (:attr:`acts_in` ``"projector"`` or ``"vision_encoder"``): one
        stage at layer 0, on each image's and video's token grid."""
        return self.acts_in in ("projector", "vision_encoder")

    def select(self, ctx: StageContext) -> torch.Tensor | Merge:
        """``(B, T)`` bool: the tokens that go on past ``ctx.layer`` (or a :class:`Merge`: those tokens and their new
        values). The mechanism always keeps each sample's last token (it predicts the next one) and drops padding,
        whatever is returned."""
        raise NotImplementedError

    def check_supported(self, config, *, video: bool = False) -> None:
        """Raise ``ValueError`` where the method cannot act on a model of ``config`` (a transformers config of a
        supported family; ``video``: on that model's videos as well): one line naming the method, the family and
        why. The one place each method declares what it needs of a model: it reads the config only (no weights),
        and :func:`~vtw.withdraw.withdraw` (before any hook), the pipeline's config check (before any weights load)
        and the FLOPs model (:func:`~vtw.flops.count_flops`, so ``mode=flops``) all ask it. Default: every family."""

    def acts_on(self, model: nn.Module) -> bool:
        """Whether the method changes anything on ``model`` (``withdraw`` installs nothing where it does not, so the
        model is untouched, bit for bit), on a model :meth:`check_supported` accepted."""
        return True

    def vision_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """For methods with ``uses_vision_layer``: ``{"image": layer, "video": layer}``, the vision tower layers of
        ``model`` whose inputs :meth:`select` reads (``"video"`` only where a second tower encodes the videos).

        Raises:
            ValueError: the model's vision tower does not have what the method needs (called by ``withdraw``,
                before any forward).
        """
        raise NotImplementedError

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        """``(vision, text)`` tokens of one sample that remain after ``stage``, given ``(vision, text)`` before it;
        for a method whose counts depend on the data, the expected counts (what ``count_flops``, ``mode=flops`` and
        ``vtw.budget`` use; a run's realized counts are :attr:`vtw.WithdrawalHandle.last_layer_tokens`)."""
        raise NotImplementedError

    def layer_tokens(self, num_layers: int, vision: int, text: int, layout=None) -> list[tuple[int, int]]:
        """``(vision, text)`` tokens each decoder layer ``0..L-1`` sees in the prefill of one sample with ``vision``
        vision and ``text`` text tokens (what the FLOPs and KV-cache models count; a layer's KV cache holds them).
        ``layout``: the sample's :class:`vtw.grids.SampleLayout`, which the methods acting before the decoder need."""
        stages = self.resolve(num_layers).stages()
        out, current, s = [], (vision, text), 0
        for layer in range(num_layers):
            while s < len(stages) and stages[s] == layer:
                current = self.stage_tokens(s, *current)
                s += 1
            out.append(current)
        return out

    def scored_inputs(self, num_layers: int) -> tuple[int, ...]:
        """One entry per attention-scoring call the method makes in a prefill (``last_token_attention``): the layer
        whose token count the call scores over (``-1``: the full input, before layer 0). ``()`` for methods that do
        not score; the FLOPs model counts this work exactly."""
        return ()

    def scoring_flops(self, config, layout, tokens=None) -> int:
        """Matmul FLOPs the method itself spends choosing and merging the tokens of one sample of
        :class:`vtw.grids.SampleLayout` ``layout`` (``None`` where the family's tokens form no grids), given
        ``tokens``: one ``(vision, text)`` pair per decoder layer, what each layer processes (the realized counts
        of a run, or :meth:`layer_tokens`). The FLOPs model counts them in ``prefill.reduction``, besides the
        :meth:`scored_inputs` calls."""
        return 0

    def budget_candidates(self, num_layers: int) -> list[Reduction]:
        """This method along its free parameter, for matched-compute comparisons (``vtw.budget``): every setting
        the matcher may choose (least compute first), the other parameters as they are. ``[]``: the method has none."""
        return []

    #: the parameter :meth:`budget_candidates` varies (recorded in results)
    free_parameter: ClassVar[str] = ""

    def params(self) -> dict:
        """The method's parameters, as given (for results and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def label(self) -> str:
        """Short human label for tables and plots, e.g. ``vtw K=3``."""
        inner = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params().items()
                         if v is not None)  # fmt: skip
        return f"{self.name} {inner}".strip()


@dataclass(frozen=True)
class OneLayer(Reduction):
    """Base of the methods with one stage at ``layer`` (``None``: none), checked against ``L`` by :meth:`resolve`."""

    layer: int | None = None

    def resolve(self, num_layers: int):
        check_layer(self.layer, num_layers)
        return self

    def stages(self) -> tuple[int, ...]:
        return () if self.layer is None else (self.layer,)


@dataclass(frozen=True)
class BeforeDecoder(Reduction):
    """Base of the methods that reduce each image's and video's tokens before the decoder: one stage at layer 0
    (the input embeddings, projected vision features included), so every decoder layer sees the shorter sequence.
    How many tokens a grid keeps is :meth:`grid_tokens`; the FLOPs model needs each sample's layout for it."""

    acts_in: ClassVar[str] = "projector"

    def grid_tokens(self, grid) -> int:
        """Tokens one :class:`vtw.grids.Grid` has after the method."""
        raise NotImplementedError

    def placed_grids(self, ctx: StageContext) -> tuple[list, list]:
        """``(layouts, placed)`` of a stage's prompt: each sample's :class:`vtw.grids.SampleLayout` and its grids placed
        in the sequence (:func:`vtw.grids.grid_positions`), read from ``ctx.inputs``; videos are checked against the
        method's :meth:`check_supported` (a family whose video frames it cannot act on raises here)."""
        from ..grids import grid_positions, input_layouts

        inputs = ctx.inputs or {}
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError(f"{self.label} finds each image's grid from input_ids; the forward was given none")
        config = ctx.model.config
        layouts = input_layouts(config, input_ids, inputs)
        if any(layout.videos for layout in layouts):
            self.check_supported(config, video=True)
        return layouts, grid_positions(config, input_ids, layouts)

    def stage_tokens(self, stage: int, vision: int, text: int) -> tuple[int, int]:
        raise ValueError(f"{self.label}: the tokens left depend on each image's grid; give the sample's layout")

    def layer_tokens(self, num_layers: int, vision: int, text: int, layout=None) -> list[tuple[int, int]]:
        if not self.resolve(num_layers).stages():
            return [(vision, text)] * num_layers
        if layout is None:
            raise ValueError(
                f"{self.label} acts on each image's token grid: the token counts need the sample's layout "
                "(vision_layout=, a vtw.grids.SampleLayout)"
            )
        if layout.tokens != vision:
            raise ValueError(f"the layout's {layout.tokens} vision tokens do not match vision_tokens={vision}")
        return [(sum(self.grid_tokens(g) for g in layout.grids), text)] * num_layers
