"""Composed Hydra config → the checked :class:`~vtw.pipeline.schema.Config`, before anything heavy happens.

:func:`validate_config` merges the composed config onto the schema (:mod:`vtw.pipeline.schema`: one dataclass per
group, both the Hydra schema and the runtime spec), turns it into those objects and checks them
(:meth:`~vtw.pipeline.schema.Config.check`); a bad value raises :class:`ConfigError` (a ``ValueError``; one line,
which ``run.py`` prints without a traceback) naming it and the allowed ones. It reads the model's config (a small
JSON, never the weights) to check ``vtw.layer`` against the model's number of decoder layers, and the method
against the model's family (the refusal ``withdraw`` gives, from the same method's check). Task names are checked
later against lmms-eval's task index, still before the model loads (:func:`vtw.pipeline.evaluate.check_tasks`).

:func:`compose_config` composes ``conf/`` the way ``run.py`` does (tests and notebooks use it), turning Hydra's
"could not find model/foo" into a ``ValueError`` that lists the available options.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .resolvers import register_resolvers
from .schema import Config, LoggerConf, build_method, load_model_config_for, register_schema

__all__ = ["Config", "ConfigError", "build_method", "compose_config", "load_model_config_for", "validate_config"]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: keys of the resolved config that do not change what a job computes (ignored when resume compares configs)
NON_RESULT_KEYS = ("resume", "resume_root", "logger", "launcher", "progress")


# ------------------------------------------------------------------------------------------------ composition
def group_options(group: str) -> list[str]:
    """Options of a config group: from Hydra's search path when Hydra is initialised, else from ``conf/``."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if gh.is_initialized():
        try:
            return sorted(gh.config_loader().get_group_options(group))
        except Exception:  # noqa: BLE001 - fall back to the files
            pass
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose ``config.yaml`` with ``overrides`` like ``run.py`` (without Hydra's runtime ``hydra:`` node).

    Raises:
        ValueError: an unknown group option (``model=foo``), naming it and listing the available ones, or an
            override that does not parse / does not exist.
    """
    from hydra import initialize_config_dir

    register_resolvers()
    register_schema()
    config_dir = str(Path(config_dir or CONF_DIR).resolve())
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose_in_app(overrides)


def compose_in_app(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """Compose ``config_name`` with ``overrides`` through the Hydra already initialised (inside ``run.py``'s app, or
    :func:`compose_config`'s context); the same ``ValueError`` lines as :func:`compose_config`."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        return compose(config_name=config_name, overrides=list(overrides))
    except MissingConfigException as e:
        group = _missing_group(str(e))
        if group:
            bad = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == group]
            raise ValueError(
                f"unknown {group} {bad[0] if bad else '?'!r}; allowed: {', '.join(group_options(group))}"
            ) from e
        raise ValueError(str(e)) from e
    except ConfigCompositionException as e:
        raise ValueError(f"bad override: {e}") from e


def _missing_group(message: str) -> str | None:
    m = re.search(r"Could not find '([\w/-]+)/[^']*'", message)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------------------ validation
class ConfigError(ValueError):
    """A config value the pipeline refuses (:func:`validate_config`): one line naming the bad value and the allowed
    ones, which ``run.py`` prints as is (no traceback) before exiting with status 1."""


def validate_config(cfg: DictConfig | dict) -> Config:
    """The config as checked :class:`~vtw.pipeline.schema.Config` objects; :class:`ConfigError` (a ``ValueError``)
    naming a bad value and the allowed ones.

    Reads the model's config (no weights) for ``L`` and for what the method needs of the model's family. Does not
    import lmms-eval or load any model.
    """
    try:
        return to_config(cfg).check()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def to_config(cfg: DictConfig | dict) -> Config:
    """``cfg`` (composed, or plain data as a job re-validates its resolved config) merged onto the schema, as
    :class:`~vtw.pipeline.schema.Config` objects (not checked yet): a key left out takes the schema's default; an
    unknown key, a wrong type or a missing mandatory value is a ``ValueError`` naming it."""
    if isinstance(cfg, DictConfig):
        try:
            data = resolved_config(cfg)
        except Exception as e:  # noqa: BLE001 - interpolation errors
            raise ValueError(f"config does not resolve: {e}") from e
    elif isinstance(cfg, dict):
        data = cfg
    else:
        raise ValueError(f"expected an omegaconf DictConfig or a dict, got {type(cfg).__name__}")
    for group in ("model", "dataset", "vtw", "logger"):
        if not isinstance(data.get(group), dict):
            raise ValueError(
                f"config has no {group!r} group; allowed {group} options: {', '.join(group_options(group))}"
            )
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as e:
        raise ValueError(f"config does not fit the schema (vtw/pipeline/schema.py): {e}") from None


def logger_conf(data: dict | None) -> LoggerConf:
    """The ``logger`` group alone (a sweep's summary logs with it), merged onto its schema and checked."""
    if data is None:
        raise ValueError("logger is missing; allowed: wandb, none")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoggerConf), data)).check()
    except OmegaConfBaseException as e:
        raise ValueError(f"config does not fit the schema (vtw/pipeline/schema.py): {e}") from None


# ------------------------------------------------------------------------------------------------ identity
def resolved_config(cfg: DictConfig) -> dict:
    """The config as plain data with every interpolation resolved (what results.json records)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return data


def result_config(resolved: dict) -> dict:
    """The part of a resolved config that determines the results (tracker, launcher, resume flags dropped)."""
    return {k: v for k, v in resolved.items() if k not in NON_RESULT_KEYS}


def config_hash(resolved: dict) -> str:
    """SHA-256 (16 hex digits) of :func:`result_config` in canonical JSON: equal hashes = identical experiments."""
    text = json.dumps(result_config(resolved), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
