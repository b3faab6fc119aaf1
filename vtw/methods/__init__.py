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
]
