"""Configs of real checkpoints, shipped with vtw so that FLOPs can be planned offline without weights.

``vtw/assets/hf_configs/<name>.json`` holds the public ``config.json`` facts of one checkpoint, its hub id as
``_name_or_path`` (provenance in that folder's README.md). :func:`load_model_config` accepts a shipped name, the checkpoint's hub id, a folder of vtw's
assets with a ``config.json`` (e.g. the embedded ``tiny-llava``), a path to a ``config.json`` or to a folder holding
one, or a config object.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig


def _assets() -> Path:
    return Path(str(resources.files("vtw") / "assets"))


def shipped_config_path(name: str) -> Path:
    return _assets() / "hf_configs" / f"{name}.json"


def _shipped_checkpoints() -> dict[str, str]:
    """``{name: hub id}`` of ``vtw/assets/hf_configs/<name>.json``, read from each file's ``_name_or_path``."""
    out = {}
    for path in sorted((_assets() / "hf_configs").glob("*.json")):
        hub = json.loads(path.read_text()).get("_name_or_path")
        if not isinstance(hub, str) or "/" not in hub:
            raise ValueError(f"{path}: _name_or_path must be the checkpoint's hub id (owner/name), got {hub!r}")
        out[path.stem] = hub
    return out


#: shipped name -> hub id of the checkpoint whose config.json it reproduces. Its one home is the shipped file's
#: ``_name_or_path`` (``conf/model/<name>.yaml`` reads it too: ``pretrained: ${vtw_checkpoint:<name>}``).
SHIPPED_CHECKPOINTS: dict[str, str] = _shipped_checkpoints()


def checkpoint_of(name: str) -> str:
    """The hub id of the shipped checkpoint ``name``; ``ValueError`` listing the shipped names otherwise."""
    if name not in SHIPPED_CHECKPOINTS:
        raise ValueError(f"no shipped checkpoint {name!r}; shipped: {', '.join(SHIPPED_CHECKPOINTS)}")
    return SHIPPED_CHECKPOINTS[name]


def available_models() -> list[str]:
    """Names :func:`load_model_config` resolves offline: the shipped checkpoints and vtw's embedded models."""
    names = set(SHIPPED_CHECKPOINTS)
    assets = _assets()
    if assets.is_dir():
        names |= {p.parent.name for p in assets.glob("*/config.json")}
    return sorted(names)


def config_from_json(path: Path) -> PretrainedConfig:
    """Build a config from a ``config.json`` offline (``AutoConfig.for_model`` on its ``model_type``)."""
    data = json.loads(Path(path).read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: no model_type in the config")
    return AutoConfig.for_model(model_type, **data)


def load_model_config(model) -> PretrainedConfig:
    """The config of ``model``: a shipped name, a hub id of a shipped checkpoint, an embedded model name, a path to a
    ``config.json`` (or a folder with one), or a config object (returned as is).

    Raises:
        ValueError: anything else, listing the names available offline.
    """
    if isinstance(model, PretrainedConfig):
        return model
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a name, a path or a config, got {type(model).__name__}")
    text = str(model)
    by_hub = {hub: name for name, hub in SHIPPED_CHECKPOINTS.items()}
    name = by_hub.get(text, text)
    if name in SHIPPED_CHECKPOINTS:
        return config_from_json(shipped_config_path(name))
    embedded = _assets() / name / "config.json"
    if "/" not in name and embedded.is_file():
        return config_from_json(embedded)
    path = Path(text)
    if path.is_dir() and (path / "config.json").is_file():
        return config_from_json(path / "config.json")
    if path.is_file() and path.suffix == ".json":
        return config_from_json(path)
    raise ValueError(
        f"unknown model {text!r}: not a shipped config nor a path to a config.json. Available offline: "
        f"{', '.join(available_models())} (or their hub ids: {', '.join(SHIPPED_CHECKPOINTS.values())})"
    )
