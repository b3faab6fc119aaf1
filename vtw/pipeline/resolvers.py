"""OmegaConf resolvers used by ``conf/`` (registered explicitly: ``run.py`` and :func:`compose_config` call
:func:`register_resolvers`; importing this module registers nothing).

| resolver | example | value |
|---|---|---|
| ``vtw_uid`` | ``${vtw_uid:}`` | 6 random hex digits, fixed for one launch (makes run/sweep dirs unique within a second) |
| ``vtw_now`` | ``${vtw_now:%H-%M-%S}`` | the launch time formatted, as Hydra's ``now`` |
| ``vtw_slug`` | ``${vtw_slug:${hydra.job.override_dirname}}`` | the text made safe as one path component |
| ``vtw_asset`` | ``${vtw_asset:tiny-llava}`` | absolute path of ``vtw/assets/<name>`` |
| ``vtw_checkpoint`` | ``${vtw_checkpoint:llava-1.5-7b}`` | hub id of a shipped checkpoint (its ``vtw/assets/hf_configs`` file) |
| ``vtw_layer_tag`` | ``${vtw_layer_tag:${vtw.layer}}`` | ``K12``, ``base`` (null), ``auto`` |

Data parallel (``torchrun`` / ``accelerate launch run.py``): every rank composes its own config, so ``run.py`` first
calls :func:`share_launch`, which gives every rank rank 0's launch time and uid (``VTW_LAUNCH_TIME`` /
``VTW_LAUNCH_UID``); ``vtw_now`` and ``vtw_uid`` read them, and all ranks work in one Hydra output directory.
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._=,+-]+")
SLUG_MAX = 80


LAUNCH_TIME_ENV, LAUNCH_UID_ENV = "VTW_LAUNCH_TIME", "VTW_LAUNCH_UID"


def new_uid() -> str:
    """6 random hex digits."""
    return secrets.token_hex(3)


def launch_uid() -> str:
    """``$VTW_LAUNCH_UID`` when set (data parallel: rank 0's), else :func:`new_uid`."""
    return os.environ.get(LAUNCH_UID_ENV) or new_uid()


def launch_now(pattern: str) -> str:
    """``$VTW_LAUNCH_TIME`` (ISO; data parallel: rank 0's) when set, else now, formatted with ``pattern``."""
    stamp = os.environ.get(LAUNCH_TIME_ENV)
    return (datetime.fromisoformat(stamp) if stamp else datetime.now()).strftime(pattern)


def share_launch() -> None:
    """With several data-parallel ranks: join the process group and set ``VTW_LAUNCH_TIME`` / ``VTW_LAUNCH_UID``
    to rank 0's on every rank (before Hydra composes; set already: kept). One process: nothing."""
    from ..lmms import distributed

    if distributed.world().size <= 1 or os.environ.get(LAUNCH_UID_ENV):
        return
    distributed.init()
    stamp, uid = distributed.broadcast((datetime.now().isoformat(), new_uid()))
    os.environ[LAUNCH_TIME_ENV], os.environ[LAUNCH_UID_ENV] = stamp, uid


def slug(text, max_len: int = SLUG_MAX) -> str:
    """``text`` as one safe path component: runs of other characters become ``_``; ``"default"`` if empty."""
    out = _SLUG_BAD.sub("_", str(text if text is not None else "")).strip("._")
    if len(out) > max_len:
        out = out[: max_len - 9] + "~" + secrets.token_hex(4)
    return out or "default"


def asset_path(name: str) -> str:
    """Absolute path of ``vtw/assets/<name>`` (whether it exists or not; the validation says if it does not)."""
    if not name or ".." in Path(name).parts:
        raise ValueError(f"vtw_asset: bad asset name {name!r}")
    return str(Path(__file__).resolve().parents[1] / "assets" / name)


def checkpoint(name: str) -> str:
    """Hub id of the shipped checkpoint ``name`` (the ``_name_or_path`` of ``vtw/assets/hf_configs/<name>.json``)."""
    from ..flops.configs import checkpoint_of

    return checkpoint_of(name)


def layer_tag(layer) -> str:
    """``K<layer>`` for an int, ``base`` for ``None`` (no withdrawal), the text otherwise (``auto``)."""
    if layer is None or str(layer).lower() in ("null", "none"):
        return "base"
    if isinstance(layer, int) and not isinstance(layer, bool):
        return f"K{layer}"
    return slug(layer)


def register_resolvers() -> None:
    """Register ``vtw_uid``, ``vtw_now``, ``vtw_slug``, ``vtw_asset``, ``vtw_checkpoint``, ``vtw_layer_tag``
    (idempotent).

    ``vtw_uid`` is cached per config (``use_cache``), like Hydra's ``now``: every interpolation of one launch, and
    every job config Hydra derives from it for a sweep, sees the same value.
    """
    OmegaConf.register_new_resolver("vtw_uid", launch_uid, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vtw_now", launch_now, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vtw_slug", slug, replace=True)
    OmegaConf.register_new_resolver("vtw_asset", asset_path, replace=True)
    OmegaConf.register_new_resolver("vtw_checkpoint", checkpoint, replace=True)
    OmegaConf.register_new_resolver("vtw_layer_tag", layer_tag, replace=True)
