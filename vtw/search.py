"""Choose the withdrawal layer ``K`` automatically: the first layer whose output stays close to the full model's.

For each sample, the next-token distribution at the last prompt position (the first generated token) of the full
model, ``P_full``, is compared with that of the model withdrawing vision tokens before candidate layer ``K``,
``P_K``. The divergence is averaged over the samples, and ``K`` is the first candidate (from ``min_layer`` up to
``L-1``) whose mean divergence is ``<= eta``. If none is, the result says so and ``layer`` is ``None`` (no
withdrawal): never a silent guess.

Divergence direction: ``"reference"`` (default) is ``KL(P_K || P_full) = sum P_K (log P_K - log P_full)``, the one
the paper's reference implementation computes (``KLDivLoss(input=log P_full, target=P_K)``); ``"forward"`` is
``KL(P_full || P_K)``.

Cost: the reference runs one full forward per candidate (about 27 per sample for 32 layers). Here each sample costs
one full forward, during which the hidden states at the input of every candidate layer are kept; then, per candidate,
only the text tokens run through layers ``K..L-1`` (no KV cache), and the LM head is applied to the last position only.
The text-only passes are cheap because vision tokens dominate the prompt.

Only torch and transformers are used here; caching, plots and logging live in :mod:`vtw.pipeline.layer_search`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .families import language_model, num_decoder_layers, vision_token_mask
from .withdraw import additive_causal_mask, gather_positions, gather_tokens, pack_kept

DIRECTIONS = ("reference", "forward")


def default_min_layer(num_layers: int) -> int:
    """First candidate: the reference starts at 5 for 32-layer models; scaled for other depths, at least 1."""
    return max(1, (5 * num_layers) // 32)


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the layer search. ``min_layer=None`` means :func:`default_min_layer`."""

    eta: float
    min_layer: int | None = None
    max_layer: int | None = None  # last candidate; None: L - 1
    direction: str = "reference"

    def check(self) -> SearchSettings:
        """Check what needs no model (``eta > 0``, a known direction); returns the settings."""
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not self.eta > 0:
            raise ValueError(f"search eta must be a number > 0, got {self.eta!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"search direction {self.direction!r} is unknown; allowed: {list(DIRECTIONS)}")
        return self

    def validate(self, num_layers: int) -> SearchSettings:
        """Check the settings against a decoder of ``num_layers`` layers; returns them with ``min_layer`` resolved."""
        self.check()
        min_layer = default_min_layer(num_layers) if self.min_layer is None else self.min_layer
        if isinstance(min_layer, bool) or not isinstance(min_layer, int) or not 0 <= min_layer <= num_layers - 1:
            raise ValueError(
                f"search min_layer {min_layer!r} is out of range: allowed 0..{num_layers - 1} (L={num_layers}) or null"
            )
        max_layer = num_layers - 1 if self.max_layer is None else self.max_layer
        if (
            isinstance(max_layer, bool)
            or not isinstance(max_layer, int)
            or not min_layer <= max_layer <= num_layers - 1
        ):
            raise ValueError(
                f"search max_layer {max_layer!r} is out of range: allowed {min_layer}..{num_layers - 1} "
                f"(min_layer..L-1, L={num_layers}) or null"
            )
        return SearchSettings(eta=float(self.eta), min_layer=min_layer, max_layer=max_layer, direction=self.direction)


@dataclass
class SearchResult:
    """Outcome of a layer search.

    Attributes:
        layer: the chosen ``K``, or ``None`` when no candidate met ``eta`` (then: no withdrawal).
        kl: mean divergence per candidate layer ``K`` (``min_layer..max_layer``, and ``K = L``: the full model, 0).
        kl_per_sample: ``kl_per_sample[i][K]`` for sample ``i``.
        message: a one-line human summary.
    """

    layer: int | None
    eta: float
    min_layer: int
    max_layer: int
    num_layers: int
    direction: str
    num_samples: int
    kl: dict[int, float]
    kl_per_sample: list[dict[int, float]] = field(default_factory=list)
    message: str = ""

    @property
    def met(self) -> bool:
        return self.layer is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kl"] = {str(k): v for k, v in self.kl.items()}
        d["kl_per_sample"] = [{str(k): v for k, v in s.items()} for s in self.kl_per_sample]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchResult:
        d = dict(d)
        d["kl"] = {int(k): float(v) for k, v in d["kl"].items()}
        d["kl_per_sample"] = [{int(k): float(v) for k, v in s.items()} for s in d.get("kl_per_sample", [])]
        return cls(**d)


def divergence(logits_k: torch.Tensor, logits_full: torch.Tensor, direction: str = "reference") -> torch.Tensor:
    """KL divergence between next-token distributions, per row.

    Args:
        logits_k: ``(B, V)`` logits with withdrawal at ``K``; logits_full: ``(B, V)`` of the full model.

    Returns:
        ``(B,)`` float64: ``KL(P_K || P_full)`` for ``"reference"``, ``KL(P_full || P_K)`` for ``"forward"``.
    """
    log_k = torch.log_softmax(logits_k.double(), dim=-1)
    log_f = torch.log_softmax(logits_full.double(), dim=-1)
    p, log_p, log_q = (log_k.exp(), log_k, log_f) if direction == "reference" else (log_f.exp(), log_f, log_k)
    return (p * (log_p - log_q)).sum(-1).clamp(min=0.0)


@torch.no_grad()
def _full_forward(model: nn.Module, inputs: dict, wanted: list[int]) -> tuple[torch.Tensor, dict, dict]:
    """One full forward: ``(last-position logits (B, V), {K: input hidden states of layer K (B, T, D)}, the decoder
    layers' keyword arguments)``; ``K = L`` is the final norm's input."""
    lm = language_model(model)
    num_layers = num_decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    layer_kwargs: dict = {}

    def keep_input(index):
        def hook(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]
            if index < num_layers and not layer_kwargs:
                layer_kwargs.update(kwargs)

        return hook

    hooks = [lm.layers[k].register_forward_pre_hook(keep_input(k), with_kwargs=True) for k in wanted if k < num_layers]
    hooks.append(lm.norm.register_forward_pre_hook(keep_input(num_layers), with_kwargs=True))
    try:
        full = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    return full, captured, layer_kwargs


def candidate_logits(model: nn.Module, inputs: dict, layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Last-position logits of the full model and of withdrawal before each of ``layers``, from one full forward.

    Args:
        inputs: one model batch (``input_ids`` (B, T), ``attention_mask`` (B, T) left-padded, pixel tensors).
        layers: candidate layers ``K`` in ``[0, L]``.

    Returns:
        ``(full (B, V), {K: (B, V)})``.
    """
    lm = language_model(model)
    num_layers = num_decoder_layers(model)
    wanted = sorted(set(layers))
    full, captured, layer_kwargs = _full_forward(model, inputs, wanted)
    input_ids = inputs["input_ids"]
    attn2d = inputs.get("attention_mask")
    if attn2d is None:
        attn2d = torch.ones_like(input_ids)
    keep_index, deep2d = pack_kept(~vision_token_mask(model, input_ids).to(full.device), attn2d.to(full.device))
    gather_index = keep_index.clamp(min=0)
    pe = layer_kwargs.get("position_embeddings")
    pe = tuple(gather_tokens(t, gather_index) for t in pe) if pe is not None else None
    pos = layer_kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.shape[-1] == input_ids.shape[1]:
        pos = gather_positions(pos, gather_index)
    head = model.get_output_embeddings()
    out: dict[int, torch.Tensor] = {}
    for k in wanted:
        h = gather_tokens(captured[k], gather_index)
        mask = additive_causal_mask(deep2d, q_len=h.shape[1], dtype=h.dtype)
        for layer in lm.layers[k:num_layers]:
            h = layer(
                h,
                attention_mask=mask,
                position_embeddings=pe,
                position_ids=pos,
                past_key_values=None,
                use_cache=False,
            )
        out[k] = head(lm.norm(h[:, -1:]))[:, -1]
    return full, out


def search_layer(model: nn.Module, batches: Iterable[dict], settings: SearchSettings) -> SearchResult:
    """Run the KL layer search on ``batches`` (model inputs, e.g. one sample each) and choose ``K``.

    Raises:
        ValueError: bad settings (``eta <= 0``, ``min_layer`` out of range, unknown direction) or no samples —
            raised before any forward.
    """
    num_layers = num_decoder_layers(model)
    settings = settings.validate(num_layers)
    candidates = [*range(settings.min_layer, settings.max_layer + 1), num_layers]  # K = L: the full model, KL 0
    per_sample: list[dict[int, float]] = []
    for batch in batches:
        full, by_layer = candidate_logits(model, batch, candidates)
        kls = {k: divergence(v, full, settings.direction) for k, v in by_layer.items()}
        for i in range(full.shape[0]):
            per_sample.append({k: float(kls[k][i]) for k in candidates})
    if not per_sample:
        raise ValueError("the layer search got no samples: give at least one")
    mean = {k: sum(s[k] for s in per_sample) / len(per_sample) for k in candidates}
    chosen = next((k for k in candidates[:-1] if mean[k] <= settings.eta), None)
    if chosen is None:
        best = min(candidates[:-1], key=lambda k: mean[k])
        message = (
            f"no layer in {settings.min_layer}..{settings.max_layer} has mean KL <= eta={settings.eta:g} "
            f"(smallest: {mean[best]:.3g} at K={best}); falling back to no withdrawal"
        )
    else:
        message = f"chose K={chosen}: mean KL {mean[chosen]:.3g} <= eta={settings.eta:g} over {len(per_sample)} samples"
    return SearchResult(
        layer=chosen,
        eta=settings.eta,
        min_layer=settings.min_layer,
        max_layer=settings.max_layer,
        num_layers=num_layers,
        direction=settings.direction,
        num_samples=len(per_sample),
        kl=mean,
        kl_per_sample=per_sample,
        message=message,
    )
