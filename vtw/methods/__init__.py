"""The registry of reduction methods: one place that config, the lmms-eval model, the FLOPs model and the tests ask.

Each method is one file of this package (a frozen dataclass, :class:`~vtw.methods.base.Reduction`, with a class
attribute ``name``); adding one is that file and its test: every module here is imported below, and every
``Reduction`` subclass with a ``name`` (and ``registered``, which ``custom`` turns off) is in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields

from .base import Reduction, StageContext, check_int, check_layer
from .custom import CustomKeep, KeepFn
from .fastv import FastV
from .pdrop import PyramidDrop
from .pool import Pool
from .random_tokens import RandomTokens
from .random_vision import RandomVision
from .visionzip import VisionZip
from .vtw import Withdrawal

for _module in pkgutil.iter_modules(__path__):  # a new method file needs no line here
    importlib.import_module(f"{__name__}.{_module.name}")


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


#: ``vtw.method=<name>`` -> the method's class: ``vtw`` first, then the others by name
METHODS: dict[str, type[Reduction]] = {
    cls.name: cls
    for cls in sorted(
        {c for c in _subclasses(Reduction) if c.name and c.registered and c.__module__.startswith(__name__)},
        key=lambda c: (c.name != "vtw", c.name),
    )
}


def method_names() -> tuple[str, ...]:
    """The names ``vtw.method`` / ``withdraw(method=...)`` / the lmms-eval ``method=`` model arg accept."""
    return tuple(METHODS)


def method_params(name: str) -> tuple[str, ...]:
    """The parameter names of method ``name`` (``ValueError`` for an unknown method)."""
    return tuple(f.name for f in fields(_method_class(name)))


def parameter_names() -> tuple[str, ...]:
    """Every parameter name some registered method takes, besides ``layer`` (``vtw.<name>`` in config, ``<name>=``
    in the lmms-eval model args), in registry order."""
    names = [f.name for cls in METHODS.values() for f in fields(cls) if f.name != "layer"]
    return tuple(dict.fromkeys(names))


def parse_params(name: str, raw: dict) -> dict:
    """The parameters of method ``name`` from text or config values, converted to the types its fields declare:
    ``"0.5"`` -> 0.5 for a float, ``"8;16;24"`` (lmms-eval model args split on commas) or a list -> a tuple.

    Raises:
        ValueError: a parameter the method does not take (naming those it takes), or a value of the wrong kind.
    """
    import types
    import typing

    cls = _method_class(name)
    hints = typing.get_type_hints(cls)
    taken = [f.name for f in fields(cls)]
    out = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key not in taken:
            raise ValueError(f"{key}={value!r} is not a parameter of method {name}; it takes: {', '.join(taken)}")
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        try:
            if typing.get_origin(kind) is tuple:
                item = typing.get_args(kind)[0]
                items = value.replace(",", ";").split(";") if isinstance(value, str) else value
                items = items if isinstance(items, (list, tuple)) else [items]
                out[key] = tuple(_convert(item, v) for v in items if str(v).strip())
            elif kind in (int, float, bool):
                out[key] = _convert(kind, value)
            else:
                out[key] = value
        except ValueError:
            raise ValueError(f"method {name}: {key}={value!r} must be {_kind_text(kind)}") from None
    return out


def _convert(kind, value):
    if kind is bool and isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false"):
            raise ValueError(value)
        return text == "true"
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int and isinstance(value, str):
        return int(value.strip())
    if kind is float and isinstance(value, str):
        return float(value.strip())
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value  # the method's own check names a wrong value


def _kind_text(kind) -> str:
    import typing

    if typing.get_origin(kind) is tuple:
        return f"a ';'-separated list of {_kind_text(typing.get_args(kind)[0]).split()[-1]}s"
    return {int: "an integer", float: "a number", bool: "true or false"}.get(kind, getattr(kind, "__name__", str(kind)))


def _method_class(name) -> type[Reduction]:
    if name not in METHODS:
        raise ValueError(f"unknown withdrawal method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def make_method(method: str | Reduction | KeepFn = "vtw", **params) -> Reduction:
    """A method object from its name and parameters (``make_method("vtw", layer=16)``), an existing method object
    (returned as is), or a ``keep(hidden, vision, attention_mask)`` callable (a one-stage :class:`CustomKeep`).

    Raises:
        ValueError: unknown method, a parameter the method does not take (naming the ones it takes), or a bad value.
    """
    if isinstance(method, Reduction):
        if params:
            raise ValueError(f"{method!r} is a method object already: give its parameters to it, not {sorted(params)}")
        return method
    if callable(method) and not isinstance(method, str):
        return CustomKeep(keep_fn=method, **params)
    cls = _method_class(method)
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"method {method!r} takes {', '.join(sorted(allowed))}; got unknown {', '.join(unknown)}")
    return cls(**params)


__all__ = [
    "METHODS",
    "CustomKeep",
    "FastV",
    "Pool",
    "PyramidDrop",
    "RandomVision",
    "RandomTokens",
    "Reduction",
    "StageContext",
    "VisionZip",
    "Withdrawal",
    "check_int",
    "check_layer",
    "make_method",
    "method_names",
    "method_params",
    "parameter_names",
    "parse_params",
]
