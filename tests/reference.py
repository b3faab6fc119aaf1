"""The one naive reference decoder the tests compare the KV-cache mechanism with.

It keeps the prefill's choice: it does not re-run a method's selection. It takes, from a withdrawal handle's
:attr:`~vtw.WithdrawalHandle.last_stages`, which input tokens each stage kept (and, where the method gave kept tokens
new values or added tokens, the values they carry), and recomputes the language decoder by hand without a KV cache
over the prompt and the tokens generated so far:

* inputs: the decoder's input embeddings and position ids of the *untouched* model's prompt forward; each new token
  embedded by the input embedding table, at the next position after the prompt's last one (every M-RoPE row alike:
  the prompt ends in text), as the mechanism's docs say (decode positions continue from the full sequence);
* layers: called one by one, in a loop written here, with an explicit additive causal mask over the tokens present
  and the rotary embedding of each token's *original* position (kept tokens keep their positions; a token a method
  added takes the position of the column it follows), or, for ``positions="compact"``, of its rank among the tokens
  present from the first stage on;
* before a stage's layer the tokens present become the stage's kept prompt tokens, in the stage's packed order,
  followed by every new token (new tokens are always kept);
* then the final norm and the LM head.

Greedy decoding (:func:`naive_generate`) recomputes everything at every step. One sample (batch of one) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtw.families import language_model


@dataclass(frozen=True)
class StageChoice:
    """What one stage of a prefill kept, for one sample.

    Attributes:
        layer: the decoder layer the stage acts before.
        columns: ``(n,)`` long, the input column of each kept token, in the stage's order (an added token: the
            column of the token it follows).
        recorded: ``(n,)`` bool, the tokens whose values are taken from :attr:`values` (tokens the method added,
            kept tokens it gave new values); the others are recomputed here.
        values: ``(n, D)`` the values the stage's layer received for these tokens, or ``None`` when no token is
            ``recorded``.
        added: ``(n,)`` bool, tokens the method added (no input token of their own).
    """

    layer: int
    columns: torch.Tensor
    recorded: torch.Tensor
    values: torch.Tensor | None
    added: torch.Tensor


def stage_choices(stages, carried: dict[int, torch.Tensor] | None = None, row: int = 0) -> list[StageChoice]:
    """The choices of ``handle.last_stages`` for sample ``row``.

    Args:
        stages: the handle's stage records (``layer``, ``keep_index`` ``(B, T_s)``, ``extra`` ``(B, T_s)``,
            ``hidden`` ``(B, T_s, D)`` or ``None``).
        carried: ``{stage: (k,) long}``, the input columns whose values the method replaced at that stage (a merge);
            their values, and those of added tokens, come from the record (``handle.record_hidden`` must be set).
        row: the sample.
    """
    out = []
    for s, rec in enumerate(stages):
        real = rec.keep_index[row] >= 0  # -1: padding added by packing
        columns = rec.keep_index[row][real].cpu()
        added = rec.extra[row][real].cpu().bool() if rec.extra is not None else torch.zeros_like(columns, dtype=bool)
        merged = (carried or {}).get(s)
        recorded = added | (torch.isin(columns, merged.cpu()) & ~added if merged is not None else False)
        values = None if rec.hidden is None else rec.hidden[row][real].cpu()
        if bool(recorded.any()) and values is None:
            raise ValueError(f"stage {s} carries new values: set handle.record_hidden = True before the prefill")
        out.append(StageChoice(int(rec.layer), columns, recorded, values, added))
    return out


def decoder_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds (1, T, D), positions)`` the language decoder of the untouched ``model`` receives for the prompt
    ``inputs`` (one sample); ``positions``: ``(1, T)``, or ``(R, 1, T)`` M-RoPE rows."""
    assert inputs["input_ids"].shape[0] == 1, "the reference runs one sample at a time"
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs.get("position_ids")

    hook = language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    embeds, positions = seen["embeds"], seen["positions"]
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    return embeds, positions


def extend(model, embeds: torch.Tensor, positions: torch.Tensor, new_ids: list[int]):
    """The prompt's ``embeds`` / ``positions`` followed by the new tokens ``new_ids`` (text, at the positions after
    the prompt's last one)."""
    if not new_ids:
        return embeds, positions
    ids = torch.tensor([new_ids], device=embeds.device)
    new_embeds = model.get_input_embeddings()(ids).to(embeds.dtype)
    steps = torch.arange(1, len(new_ids) + 1, device=positions.device)
    return torch.cat([embeds, new_embeds], 1), torch.cat([positions, positions[..., -1:] + steps], -1)


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``(1, 1, n, n)``: 0 on and below the diagonal, the dtype's minimum above."""
    return torch.triu(torch.full((n, n), torch.finfo(dtype).min, dtype=dtype), diagonal=1)[None, None]


def _rotary(lm, h: torch.Tensor, positions: torch.Tensor):
    """``((cos, sin), position ids)`` the layers take for ``h`` at ``positions`` (Qwen's 4-row position ids carry the
    text positions in row 0; the rotary module and the layers take rows 1..3)."""
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]
    return lm.rotary_emb(h, positions), positions


def _apply_stage(choice: StageChoice, h: torch.Tensor, columns: torch.Tensor, added: torch.Tensor, n_prompt: int):
    """The tokens after ``choice``: its kept prompt tokens (recomputed values, or recorded ones), then every new
    token. ``h`` ``(1, n, D)``, ``columns`` / ``added`` ``(n,)``: the tokens present. Returns the same three."""
    present = {c: j for j, (c, a) in enumerate(zip(columns.tolist(), added.tolist())) if not a}
    missing = [c for c, r in zip(choice.columns.tolist(), choice.recorded.tolist()) if not r and c not in present]
    if missing:
        raise AssertionError(f"stage at layer {choice.layer} keeps input columns {missing} that are not present")
    local = torch.tensor([present.get(c, 0) for c in choice.columns.tolist()], dtype=torch.long)
    values = h[0, local]
    if choice.values is not None:
        values = torch.where(choice.recorded[:, None], choice.values.to(h), values)
    new = columns >= n_prompt
    h = torch.cat([values[None], h[:, new]], dim=1)
    return h, torch.cat([choice.columns, columns[new]]), torch.cat([choice.added, added[new]])


def naive_logits(
    model, embeds: torch.Tensor, positions: torch.Tensor, n_prompt: int, choices: list[StageChoice], compact=False
) -> torch.Tensor:
    """Logits ``(n_out, V)`` of the tokens that reach the last layer, in order, computed without a cache.

    Args:
        embeds: ``(1, N, D)`` decoder inputs of the prompt (``n_prompt`` tokens) and the new tokens after it.
        positions: their position ids (:func:`decoder_inputs`, :func:`extend`).
        choices: the prefill's stage choices (:func:`stage_choices`), over the prompt's columns.
        compact: ``positions="compact"``: from the first stage on, the tokens present are numbered ``0, 1, ...``
            (1-D positions only); else every token keeps its position (an added token: its column's).
    """
    lm = language_model(model)
    h, columns = embeds, torch.arange(embeds.shape[1])
    added = torch.zeros_like(columns, dtype=torch.bool)
    at = {c.layer: c for c in choices}
    rope = _rotary(lm, h, positions)
    for i, layer in enumerate(lm.layers):
        if i in at:
            h, columns, added = _apply_stage(at[i], h, columns, added, n_prompt)
            pos = torch.arange(columns.numel())[None] if compact else positions[..., columns]
            rope = _rotary(lm, h, pos)
        (cos, sin), pos = rope
        h = layer(h, attention_mask=causal_mask(h.shape[1], h.dtype), position_embeddings=(cos, sin),
                  position_ids=pos, past_key_values=None, use_cache=False)  # fmt: skip
    return model.lm_head(lm.norm(h))[0]


def naive_generate(
    model, inputs: dict, choices: list[StageChoice], steps: int, compact: bool = False
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding of ``steps`` tokens, everything recomputed at each step: ``(tokens, logits (steps, V))``.
    ``model`` must be untouched (no handle installed); ``inputs``: one sample's prompt; ``compact``: as
    :func:`naive_logits`."""
    embeds, positions = decoder_inputs(model, inputs)
    n_prompt = embeds.shape[1]
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = naive_logits(model, *extend(model, embeds, positions, tokens), n_prompt, choices, compact)[-1]
            tokens.append(int(out.argmax()))
            logits.append(out)
    return tokens, torch.stack(logits)


def counting(cls, sink: list, *, with_inputs: bool = False):
    """A subclass of the method class ``cls`` whose ``select`` appends to ``sink`` the matmul FLOPs it spent, counted
    by ``FlopCounterMode`` (``(flops, ctx.inputs)`` with ``with_inputs``): the independent measure of a method's own
    scoring cost (:meth:`vtw.methods.Reduction.scoring_flops`). A method acting in the vision encoder decides in
    ``decide`` (once per encoder call) before its ``select``: what those calls spent is added to the next entry."""
    from torch.utils.flop_counter import FlopCounterMode

    earlier = [0]

    def select(self, ctx):
        with FlopCounterMode(display=False) as counter:
            out = cls.select(self, ctx)
        flops, earlier[0] = counter.get_total_flops() + earlier[0], 0
        sink.append((flops, ctx.inputs) if with_inputs else flops)
        return out

    def decide(self, *args):
        with FlopCounterMode(display=False) as counter:
            out = cls.decide(self, *args)
        earlier[0] += counter.get_total_flops()
        return out

    body = {"select": select, "__module__": __name__}
    if hasattr(cls, "decide"):
        body["decide"] = decide
    return type(f"Counted{cls.__name__}", (cls,), body)


def counted_prefill(model, inputs: dict, method, sink: list) -> list:
    """One prefill of ``inputs`` under ``method`` (an instance of a :func:`counting` class whose entries go to
    ``sink``, cleared first): returns the realized ``(vision, text)`` tokens of each layer of sample 0."""
    from vtw import withdraw

    sink.clear()
    with torch.no_grad(), withdraw(model, method=method) as handle:
        model(**inputs)
    return handle.last_layer_tokens[0].tolist()
