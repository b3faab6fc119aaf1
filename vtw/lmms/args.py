"""A method's parameters from config values or lmms-eval model-arg text, converted by OmegaConf.

Each registered method's parameters get a structured config generated from the method's own dataclass fields
(:func:`method_schema`: ``float`` stays ``float``, ``tuple[int, ...]`` becomes a list of ints, every one optional),
so OmegaConf converts (``"0.5"`` -> 0.5, ``"true"`` -> True, ``"8;16;24"`` -> ``(8, 16, 24)``; lmms-eval splits
model args on commas, so list items are separated by ``;``) and rejects values of the wrong kind; the values
themselves are checked by the method (its ``__post_init__``). The pipeline's ``vtw`` config group and the lmms-eval
model ``vtw`` both come here; nothing here imports lmms-eval.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import field, fields, make_dataclass

from ..methods import METHODS, method_names

_SCALARS = (int, float, bool, str)
_KIND_TEXT = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _config_type(hint):
    """The config type of a method field's annotation (``None``: not configurable, e.g. a callable)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in _SCALARS:
        return list[typing.get_args(hint)[0]]
    return hint if hint in _SCALARS else None


@functools.cache
def method_schema(name: str) -> type:
    """The structured config of method ``name``'s parameters: one optional field per configurable field of its
    dataclass, typed from it (``ValueError`` for an unknown method)."""
    if name not in METHODS:
        raise ValueError(f"unknown withdrawal method {name!r}; allowed: {', '.join(method_names())}")
    cls = METHODS[name]
    hints = typing.get_type_hints(cls)
    spec = [(f.name, _config_type(hints[f.name])) for f in fields(cls)]
    return make_dataclass(f"{cls.__name__}Params", [(n, t | None, field(default=None)) for n, t in spec if t])


def method_args(name: str, raw: dict) -> dict:
    """``raw`` (config values or model-arg text; ``None`` values left out) as the typed parameters of method
    ``name`` (lists as tuples), ready for :func:`vtw.methods.make_method`.

    Raises:
        ValueError: a parameter the method does not take (naming those it takes), or a value of the wrong kind.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = method_schema(name)
    node = OmegaConf.structured(schema)
    kinds = {f.name: f.type for f in fields(schema)}
    out = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key not in kinds:
            raise ValueError(f"{key}={value!r} is not a parameter of method {name}; it takes: {', '.join(kinds)}")
        listed = typing.get_origin(typing.get_args(kinds[key])[0]) is list
        given = _items(value) if listed else value
        if typing.get_args(kinds[key])[0] is int and isinstance(value, float) and value.is_integer():
            given = int(value)  # 4.0 from Python is layer 4
        try:
            converted = OmegaConf.to_object(OmegaConf.merge(node, {key: given}))
        except OmegaConfBaseException:
            raise ValueError(f"method {name}: {key}={value!r} must be {_kind_text(kinds[key])}") from None
        converted = getattr(converted, key)
        out[key] = tuple(converted) if listed else converted
    return out


def _items(value) -> list:
    """A list parameter: ``"8;16;24"`` (or ``,``-separated), a sequence, or one value."""
    if isinstance(value, str):
        return [v.strip() for v in value.replace(",", ";").split(";") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _kind_text(kind) -> str:
    kind = typing.get_args(kind)[0]  # X | None
    if typing.get_origin(kind) is list:
        return f"a ';'-separated list of {_KIND_TEXT[typing.get_args(kind)[0]].split()[-1]}s"
    return _KIND_TEXT.get(kind, str(kind))
