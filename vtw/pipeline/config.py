"""Composed Hydra config → validated, typed :class:`RunSpec`, before anything heavy happens.

:func:`validate_config` checks every value the pipeline uses and raises :class:`ConfigError` (a ``ValueError``; one
line, which ``run.py`` prints without a traceback) naming the bad value and the allowed ones. It reads the model's
config (a small JSON, never the weights) to check ``vtw.layer`` against the model's number of decoder layers, and the
method against the model's family (the refusal ``withdraw`` gives, from the same method's check). Task names are
checked later against lmms-eval's task index, still before the model loads (:func:`vtw.pipeline.evaluate.check_tasks`).

:func:`compose_config` composes ``conf/`` the way ``run.py`` does (tests and notebooks use it), turning Hydra's
"could not find model/foo" into a ``ValueError`` that lists the available options.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..methods import (
    Reduction,
    Withdrawal,
    check_layer,
    make_method,
    method_names,
    method_params,
    parameter_names,
    parse_params,
)
from ..options import DTYPE_CHOICES, SUPPORTED_ATTENTION, parse_device_map
from ..search import SearchSettings
from ..withdraw import POSITIONS, check_positions
from .resolvers import register_resolvers
from .schema import Config, LoggerConf, register_schema

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MODES = ("eval", "flops", "search", "analyze", "choose")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")
COMPARE = ("auto", True, False)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: keys of the resolved config that do not change what a job computes (ignored when resume compares configs)
NON_RESULT_KEYS = ("resume", "resume_root", "logger", "launcher", "progress")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str
    config: str
    family: str
    num_layers: int
    dtype: str
    batch_size: int
    attn_implementation: str
    max_new_tokens: int
    chat_template: str | None
    max_frames_num: int
    device_map: str | dict | None = None
    max_memory: dict | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    tasks: tuple[str, ...]
    include_path: tuple[str, ...]
    limit: int | float | None
    primary_metric: str | None


@dataclass(frozen=True)
class SearchSpec:
    """KL layer search settings (``vtw.search.*``); ``min_layer=None``: ``vtw.search.default_min_layer(L)``."""

    tasks: tuple[str, ...] | None
    limit: int
    eta: float
    min_layer: int | None
    max_layer: int | None
    direction: str = "reference"


@dataclass(frozen=True)
class LoggerSpec:
    name: str
    mode: str = "disabled"
    project: str = "vtw"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    log_samples: bool = True


@dataclass(frozen=True)
class RunSpec:
    """Everything a job needs, validated. ``layer`` is ``None``, an int in ``[0, L]``, or ``"auto"``."""

    mode: str
    model: ModelSpec
    dataset: DatasetSpec
    layer: int | str | None
    method: str
    search: SearchSpec
    logger: LoggerSpec
    seed: int
    device: str
    compare_baseline: bool | str
    resume: bool
    resume_root: str
    bootstrap_iters: int
    progress: bool
    flops: dict = field(default_factory=dict)
    method_params: dict = field(default_factory=dict)  # keep / layers / seed as given (the others: the defaults)
    positions: str = "keep"  # vtw.positions
    budget: float | None = None
    budget_limit: int = 32
    analyze_limit: int = 32
    candidates: tuple[str, ...] = ()  # vtw.method=auto: the methods it chooses among (those that act on the model)
    choose: dict = field(default_factory=dict)  # vtw.choose: tasks, limit, max_new_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    def reduction(self, layer: int | None) -> Reduction:
        """The method object this job evaluates at ``layer`` (``None``: the full model, whatever the method; for
        ``vtw.method=auto``, once chosen: ``dataclasses.replace(spec, method=name)``)."""
        if self.method == "auto" and layer is not None:
            raise ValueError("vtw.method=auto: choose the method first (vtw.pipeline.choose.run_choose)")
        return build_method(self.method, layer, self.method_params)


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
def _choice(value, allowed: Sequence, what: str):
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
    return value


def _int(value, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what}={value!r} must be >= {minimum}")
    return value


def _str(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}={value!r} must be a non-empty string")
    return value


def _str_list(value, what: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ValueError(f"{what}={value!r} must be a {'' if allow_empty else 'non-empty '}list of strings")
    for v in value:
        _str(v, f"{what} item")
    return tuple(value)


def looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.path.isabs(text)


def load_model_config_for(spec_pretrained: str, config_ref: str):
    """The transformers config named by ``model.config`` (shipped name, hub id, local path) — no weights."""
    from ..flops.configs import load_model_config

    ref = config_ref or spec_pretrained
    if looks_like_path(ref) and not Path(os.path.expanduser(ref)).exists():
        raise ValueError(f"model.config={ref!r}: no such file or directory")
    try:
        return load_model_config(os.path.expanduser(ref) if looks_like_path(ref) else ref)
    except ValueError:
        pass
    try:  # a hub id that is not shipped: the local HF cache may have it
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(ref)
    except Exception as e:  # noqa: BLE001
        from ..flops.configs import available_models

        raise ValueError(
            f"model.config={ref!r}: cannot read the model's config offline ({type(e).__name__}); set model.config to "
            f"a local path or one of the shipped configs: {', '.join(available_models())}"
        ) from None


def _model(m: dict) -> tuple[ModelSpec, object]:
    """The model's spec and its transformers config (read offline, no weights)."""
    from ..families import get_family, num_decoder_layers

    name = _str(m["name"], "model.name")
    pretrained = _str(m["pretrained"], "model.pretrained")
    if looks_like_path(pretrained) and not (Path(os.path.expanduser(pretrained)) / "config.json").is_file():
        raise ValueError(f"model.pretrained={pretrained!r}: no such model directory (no config.json there)")
    config_ref = m["config"] or pretrained
    hf_config = load_model_config_for(pretrained, config_ref)
    family = get_family(hf_config).model_type
    template = m["chat_template"]
    try:
        device_map, max_memory = parse_device_map(m.get("device_map"), m.get("max_memory"))
    except ValueError as e:
        raise ValueError(f"model.{e}") from None
    spec = ModelSpec(
        name=name,
        pretrained=pretrained,
        config=str(config_ref),
        family=family,
        num_layers=num_decoder_layers(hf_config),
        dtype=_choice(m["dtype"], DTYPE_CHOICES, "model.dtype"),
        batch_size=_int(m["batch_size"], "model.batch_size", 1),
        attn_implementation=_choice(m["attn_implementation"], SUPPORTED_ATTENTION, "model.attn_implementation"),
        max_new_tokens=_int(m["max_new_tokens"], "model.max_new_tokens", 1),
        chat_template=None if template in (None, "") else str(template),
        max_frames_num=_int(m["max_frames_num"], "model.max_frames_num", 1),
        device_map=device_map,
        max_memory=max_memory,
    )
    return spec, hf_config


def _limit(value):
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"dataset.limit={value!r} must be null, a positive integer or a fraction in (0, 1)")
    if isinstance(value, int) and value >= 1:
        return value
    if isinstance(value, float) and 0 < value < 1:
        return value
    raise ValueError(f"dataset.limit={value!r} must be null, a positive integer or a fraction in (0, 1)")


def _dataset(d: dict) -> DatasetSpec:
    tasks = _str_list(d["tasks"], "dataset.tasks")
    include = _str_list(d["include_path"], "dataset.include_path", allow_empty=True)
    for p in include:
        if not Path(p).is_dir():
            raise ValueError(f"dataset.include_path entry {p!r} is not a directory")
    primary = d["primary_metric"]
    if primary is not None:
        primary = _str(primary, "dataset.primary_metric")
        task = primary.split("/", 1)[0]
        if "/" not in primary or task not in tasks:
            raise ValueError(
                f"dataset.primary_metric={primary!r} must be '<task>/<metric>' with <task> in {list(tasks)}"
            )
    return DatasetSpec(
        name=_str(d["name"], "dataset.name"),
        tasks=tasks,
        include_path=tuple(str(Path(p).resolve()) for p in include),
        limit=_limit(d["limit"]),
        primary_metric=primary,
    )


def _layer(value, num_layers: int, model: str):
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("null", "none"):
        return None
    try:
        return check_layer(value, num_layers)
    except ValueError as e:
        raise ValueError(
            f"vtw.layer={value!r} is not a valid layer for model {model} ({e}); allowed: null (no withdrawal), an "
            f"integer 0..{num_layers}, or auto"
        ) from None


def _search(s: dict | None, num_layers: int, used: bool) -> SearchSpec:
    """The search settings, checked by the layer search's own rules (:meth:`vtw.search.SearchSettings.validate`)
    against ``L`` when the search will run."""
    s = s or {}
    tasks = s["tasks"]
    lo, hi = s["min_layer"], s["max_layer"]
    settings = SearchSettings(eta=s["eta"], min_layer=lo, max_layer=hi, direction=s["direction"])
    try:  # the candidate range only when the search runs
        settings.validate(num_layers) if used else settings.check()
    except ValueError as e:
        raise ValueError(f"vtw.{e}") from None
    return SearchSpec(
        tasks=None if tasks is None else _str_list(tasks, "vtw.search.tasks"),
        limit=_int(s["limit"], "vtw.search.limit", 1),
        eta=float(settings.eta),
        min_layer=lo,
        max_layer=hi,
        direction=settings.direction,
    )


def _schema_merged(data: dict, node) -> dict:
    """``data`` merged onto the schema node (its defaults filled in, its types checked), as plain data."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(node), data)
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ValueError(f"config does not fit the schema (vtw/pipeline/schema.py): {e}") from None


def build_method(name: str, layer: int | None, params: dict) -> Reduction:
    """``vtw.method`` with ``params`` at ``layer``: ``None`` is the full model for every method; ``layer`` is given to
    the methods that take one (``vtw``, ``fastv``, ``random_vision``, ``random``; ``pdrop`` has ``layers``)."""
    if layer is None:
        return Withdrawal()
    kw = dict(params)
    if "layer" in method_params(name):
        kw["layer"] = layer
    return make_method(name, **kw)


def _method(vtw: dict, layer, model: ModelSpec, hf_config, video: bool = False) -> tuple[str, dict, float | None]:
    """``(method name, its parameters given, budget)``, the method built and checked against ``L`` and against the
    model's family (``video``: and its videos; :meth:`~vtw.methods.Reduction.check_supported`, the refusal
    ``withdraw`` gives); the budget's matching needs prompts, so only its range is checked here."""
    from ..flops.budget import check_budget

    name = _choice(vtw["method"], method_names(), "vtw.method")
    params = {}
    for key in parameter_names():
        value = vtw.get(key)
        if value is None:
            continue
        if key not in method_params(name):
            raise ValueError(f"vtw.{key}={value!r} is not a parameter of vtw.method={name}; it takes: "
                             f"{', '.join(p for p in method_params(name) if p != 'keep_fn')}")  # fmt: skip
        try:
            params.update(parse_params(name, {key: value}))
        except ValueError as e:
            raise ValueError(f"vtw.{e}") from None
    budget = vtw.get("budget")
    if budget is not None:
        try:
            budget = check_budget(budget)
        except ValueError as e:
            raise ValueError(f"vtw.{e}") from None
    if layer == "auto" and name != "vtw":
        raise ValueError(f"vtw.layer=auto (the KL layer search) chooses VTW's K; vtw.method={name} needs a layer")
    if layer == "auto" and budget is not None:
        raise ValueError("vtw.layer=auto and vtw.budget both choose K: give one of them")
    try:
        make_method(name, **params)  # the parameters, whatever the layer (vtw.layer=null runs the full model)
        method = build_method(name, layer, params).resolve(model.num_layers) if isinstance(layer, int) else None
    except ValueError as e:
        raise ValueError(f"vtw.method={name}: {e}") from None
    if method is not None:
        try:
            method.check_supported(hf_config, video=video)
        except ValueError as e:
            raise ValueError(f"vtw.method={name} with model={model.name}: {e}") from None
    return name, params, budget


def _auto(vtw: dict, layer, model: ModelSpec, hf_config) -> tuple[str, dict, float, tuple[str, ...]]:
    """``("auto", {}, budget, candidates)`` of ``vtw.method=auto`` (every registered method that can act on the
    model) or ``vtw.method=[a, b]`` (those, each of which must act on it); one-line errors before any weights load."""
    from ..flops.budget import check_budget

    given = vtw["method"]
    names = list(method_names()) if given == "auto" else [_choice(n, method_names(), "vtw.method") for n in given]
    if not names:
        raise ValueError("vtw.method=[] names no candidate; give vtw.method=auto or a list of method names")
    if vtw.get("budget") is None:
        raise ValueError("vtw.method=auto chooses at a compute budget: give vtw.budget=F (0 < F <= 1)")
    try:
        budget = check_budget(vtw["budget"])
    except ValueError as e:
        raise ValueError(f"vtw.{e}") from None
    if layer == "auto":
        raise ValueError("vtw.layer=auto (the KL layer search) chooses VTW's K; vtw.method=auto needs a layer")
    given_params = [k for k in parameter_names() if vtw.get(k) is not None]
    if given_params:
        raise ValueError(f"vtw.{given_params[0]} does not combine with vtw.method=auto: the budget sets each candidate")
    candidates = []
    for name in dict.fromkeys(names):
        try:
            if layer is not None:
                build_method(name, layer, {}).resolve(model.num_layers).check_supported(hf_config)
        except ValueError as e:
            if given != "auto":
                raise ValueError(f"vtw.method candidate {name} with model={model.name}: {e}") from None
            continue  # auto: the methods that cannot act on the model are no candidates
        candidates.append(name)
    return "auto", {}, budget, tuple(candidates)


def _choose(choose: dict) -> dict:
    tasks = choose.get("tasks")
    return {
        "tasks": None if tasks is None else list(_str_list(tasks, "vtw.choose.tasks")),
        "limit": _int(choose["limit"], "vtw.choose.limit", 1),
        "max_new_tokens": _int(choose["max_new_tokens"], "vtw.choose.max_new_tokens", 1),
    }


def logger_spec(lg: dict | None) -> LoggerSpec:
    if lg is None:
        raise ValueError(f"logger is missing; allowed: {', '.join(LOGGERS)}")
    lg = _schema_merged(lg, LoggerConf)
    name = _choice(lg["name"], LOGGERS, "logger")
    if name == "none":
        return LoggerSpec(name="none")
    return LoggerSpec(
        name=name,
        mode=_choice(lg["mode"], WANDB_MODES, "logger.mode"),
        project=_str(lg["project"], "logger.project"),
        entity=lg["entity"],
        group=lg["group"],
        tags=_str_list(lg["tags"], "logger.tags", allow_empty=True),
        log_samples=bool(lg["log_samples"]),
    )


class ConfigError(ValueError):
    """A config value the pipeline refuses (:func:`validate_config`): one line naming the bad value and the allowed
    ones, which ``run.py`` prints as is (no traceback) before exiting with status 1."""


def validate_config(cfg: DictConfig | dict) -> RunSpec:
    """Check every value the pipeline uses; :class:`ConfigError` (a ``ValueError``) naming the bad value and the
    allowed ones.

    Reads the model's config (no weights) for ``L`` and for what the method needs of the model's family. Does not
    import lmms-eval or load any model.
    """
    try:
        return _validate(cfg)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _validate(cfg: DictConfig | dict) -> RunSpec:
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
    data = _schema_merged(data, Config)
    mode = _choice(data["mode"], MODES, "mode")
    model, hf_config = _model(data["model"])
    vtw = data["vtw"]
    layer = _layer(vtw["layer"], model.num_layers, model.name)
    video = mode == "flops" and bool(data["flops"].get("video_frames"))  # the sample mode=flops plans is a video
    auto = vtw["method"] == "auto" or isinstance(vtw["method"], (list, tuple))
    if auto:
        method, params, budget, candidates = _auto(vtw, layer, model, hf_config)
    else:
        (method, params, budget), candidates = _method(vtw, layer, model, hf_config, video), ()
    if mode == "choose" and not auto:
        raise ValueError(f"mode=choose chooses a method: give vtw.method=auto (or a list of candidates), not {method}")
    positions = _choice(vtw["positions"], POSITIONS, "vtw.positions")
    try:
        check_positions(positions, hf_config)
    except ValueError as e:
        raise ValueError(f"vtw.positions={positions} with model={model.name}: {e}") from None
    compare = data["compare_baseline"]
    if compare not in COMPARE:
        raise ValueError(f"compare_baseline={compare!r} is not allowed; allowed: auto, true, false")
    device = data["device"]
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"device={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    _check_parallel(mode, model)
    return RunSpec(
        mode=mode,
        model=model,
        dataset=_dataset(data["dataset"]),
        layer=layer,
        method=method,
        search=_search(vtw["search"], model.num_layers, used=layer == "auto" or mode == "search"),
        logger=logger_spec(data["logger"]),
        seed=_int(data["seed"], "seed", 0),
        device=device,
        compare_baseline=compare,
        resume=bool(data["resume"]),
        resume_root=str(data["resume_root"]),
        bootstrap_iters=_int(data["bootstrap_iters"], "bootstrap_iters", 0),
        progress=bool(data["progress"]),
        flops=dict(data["flops"]),
        method_params=params,
        positions=positions,
        budget=budget,
        budget_limit=_int(vtw["budget_limit"], "vtw.budget_limit", 1),
        analyze_limit=_int(data["analyze"]["limit"], "analyze.limit", 1),
        candidates=candidates,
        choose=_choose(vtw["choose"]),
    )


def _check_parallel(mode: str, model: ModelSpec) -> None:
    """Data parallel (``WORLD_SIZE > 1``: torchrun, accelerate launch, a SLURM job with several tasks) evaluates;
    it does not combine with ``model.device_map`` (model parallel in one process), nor with the other modes."""
    from ..lmms.distributed import world

    size = world().size
    if size <= 1:
        return
    if model.device_map is not None:
        raise ValueError(
            f"model.device_map={model.device_map!r} (model parallel) cannot be combined with data parallel "
            f"(WORLD_SIZE={size}); run one process with model.device_map, or {size} processes without it"
        )
    if mode != "eval":
        raise ValueError(
            f"mode={mode} runs in one process; data parallel (WORLD_SIZE={size}) is for mode=eval (launch "
            f"mode={mode} with plain `python run.py`)"
        )


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
