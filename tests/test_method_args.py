"""Method parameters from text (lmms-eval model args) and config values: every registered method's every parameter,
converted by the schema generated from the method's fields (:mod:`vtw.lmms.args`)."""

from __future__ import annotations

import dataclasses

import pytest

from vtw.lmms.args import method_args, method_schema
from vtw.methods import METHODS, make_method


def _text(value) -> str:
    """How a value is written in lmms-eval's ``--model_args`` (lists with ``;``, booleans lower case)."""
    if isinstance(value, tuple):
        return ";".join(_text(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _example(cls):
    """A method object with every optional parameter set (``layer`` 2; stage layers 1;3 where it has them)."""
    obj = cls(**({"layer": 2} if "layer" in {f.name for f in dataclasses.fields(cls)} else {}))
    if getattr(obj, "layers", "absent") is None:
        obj = dataclasses.replace(obj, layers=(1, 3), keep=(0.5, 0.25))
    return obj


@pytest.mark.parametrize("name", list(METHODS))
def test_every_parameter_round_trips_through_text_and_config_values(name):
    obj = _example(METHODS[name])
    given = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}
    given = {k: v for k, v in given.items() if not callable(v)}
    assert set(given) <= {f.name for f in dataclasses.fields(method_schema(name))}
    from_text = method_args(name, {k: _text(v) for k, v in given.items()})
    from_config = method_args(name, {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()})
    assert from_text == from_config == given
    assert make_method(name, **from_text) == obj


@pytest.mark.parametrize(
    ("name", "raw", "needle"),
    [
        ("pdrop", {"layers": "1;x;3"}, "layers='1;x;3' must be a ';'-separated list of integers"),
        ("fastv", {"keep": "half"}, "keep='half' must be a number"),
        ("fastv", {"layer": 2.5}, "layer=2.5 must be an integer"),
        ("prumerge", {"plus": "maybe"}, "plus='maybe' must be true or false"),
        ("vtw", {"keep": 0.5}, "keep=0.5 is not a parameter of method vtw; it takes: layer"),
    ],
)
def test_wrong_kinds_are_refused_naming_the_value(name, raw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(";", ";")):
        method_args(name, raw)


def test_numbers_are_converted_to_the_fields_types():
    assert method_args("fastv", {"layer": "4", "keep": "1"}) == {"layer": 4, "keep": 1.0}
    assert method_args("fastv", {"layer": 4.0}) == {"layer": 4}  # an integer-valued float from Python
    assert method_args("sparsevlm", {"layers": "2,4", "recycle": 0}) == {"layers": (2, 4), "recycle": 0.0}
