"""The config: one dataclass per group, both the Hydra schema and the runtime spec.

``conf/config.yaml`` starts its defaults list with ``vtw_schema`` (registered here in Hydra's ConfigStore), so every
group option (``conf/model/*.yaml`` ...) and every command-line override is merged into these typed nodes: a key
that does not exist (``model.batchsize=8``) or a value of the wrong type (``model.batch_size=eight``) fails at
composition, with Hydra's message naming the key and the value. :func:`vtw.pipeline.config.validate_config` turns
the merged config into these objects (``OmegaConf.to_object``) and calls :meth:`Config.check`, which asks each
group to check itself (:meth:`ModelConf.check` ...) and checks what spans groups (``vtw.layer <= L``, the method
against the model's family). What the types cannot say is checked there, once, before any model loads; the checked
objects are what a job runs on (``spec.model.num_layers``, ``spec.vtw.params`` ...).

The model group extends :class:`vtw.options.ModelArgs`, the arguments the lmms-eval model ``vtw`` takes too, so a
loading option and its check are written once. The ``vtw`` group's method parameters are generated from the method
registry (:data:`vtw.methods.METHODS`): a new parameter of a method needs no line here; the values given are
converted by OmegaConf against a schema generated from the chosen method's own fields (:func:`vtw.lmms.args.method_args`,
which the lmms-eval model uses too) and checked by the method itself (its ``__post_init__``).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import II, MISSING

from ..lmms.args import method_args
from ..methods import method_names, method_params, parameter_names
from ..options import ModelArgs, check_choice, check_count, check_text
from ..search import SearchSettings
from ..withdraw import POSITIONS, check_positions

SCHEMA_NAME = "vtw_schema"
MODES = ("eval", "flops", "search", "analyze", "choose")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")
COMPARE = ("auto", True, False)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _texts(value, what: str, *, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ValueError(f"{what}={value!r} must be a {'' if allow_empty else 'non-empty '}list of strings")
    for v in value:
        check_text(v, f"{what} item")
    return list(value)


def looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.path.isabs(text)


def load_model_config_for(pretrained: str, config_ref: str | None):
    """The transformers config named by ``model.config`` (shipped name, hub id, local path) — no weights."""
    from ..flops.configs import available_models, load_model_config

    ref = config_ref or pretrained
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
        raise ValueError(
            f"model.config={ref!r}: cannot read the model's config offline ({type(e).__name__}); set model.config to "
            f"a local path or one of the shipped configs: {', '.join(available_models())}"
        ) from None


@dataclass
class ModelConf(ModelArgs):
    """``model``: :class:`~vtw.options.ModelArgs` plus the pipeline's keys. After :meth:`check`: ``hf_config`` (the
    transformers config, read offline), ``family`` (its ``model_type``) and ``num_layers`` (``L``)."""

    name: str = MISSING
    config: str | None = None  # config read without weights (shipped name, hub id, path); null: pretrained's
    default_layer: int | None = None  # vtw.layer when none is given
    kl_eta: float = 0.003  # KL threshold of the layer search

    @property
    def config_ref(self) -> str:
        """What the config is read from: ``model.config``, else ``model.pretrained``."""
        return str(self.config or self.pretrained)

    def check(self, prefix: str = "model.") -> ModelConf:
        from ..families import get_family, num_decoder_layers

        check_text(self.name, "model.name")
        ModelArgs.check(self, prefix)
        path = Path(os.path.expanduser(self.pretrained))
        if looks_like_path(self.pretrained) and not (path / "config.json").is_file():
            raise ValueError(f"model.pretrained={self.pretrained!r}: no such model directory (no config.json there)")
        self.hf_config = load_model_config_for(self.pretrained, self.config)
        self.family = get_family(self.hf_config).model_type
        self.num_layers = num_decoder_layers(self.hf_config)
        return self


@dataclass
class DatasetConf:
    name: str = MISSING
    tasks: list[str] = MISSING
    include_path: list[str] = field(default_factory=list)
    limit: Any = None  # null | int >= 1 | fraction in (0, 1)
    primary_metric: str | None = None

    def check(self) -> DatasetConf:
        check_text(self.name, "dataset.name")
        self.tasks = _texts(self.tasks, "dataset.tasks")
        for p in _texts(self.include_path, "dataset.include_path", allow_empty=True):
            if not Path(p).is_dir():
                raise ValueError(f"dataset.include_path entry {p!r} is not a directory")
        self.include_path = [str(Path(p).resolve()) for p in self.include_path]
        limit = self.limit
        if not (limit is None or (type(limit) is int and limit >= 1) or (type(limit) is float and 0 < limit < 1)):
            raise ValueError(f"dataset.limit={limit!r} must be null, a positive integer or a fraction in (0, 1)")
        if self.primary_metric is not None:
            check_text(self.primary_metric, "dataset.primary_metric")
            if "/" not in self.primary_metric or self.primary_metric.split("/", 1)[0] not in self.tasks:
                raise ValueError(
                    f"dataset.primary_metric={self.primary_metric!r} must be '<task>/<metric>' with <task> in "
                    f"{self.tasks}"
                )
        return self


@dataclass
class SearchConf:
    tasks: list[str] | None = None
    limit: int = 20
    eta: float = II("model.kl_eta")
    min_layer: int | None = None
    max_layer: int | None = None
    direction: str = "reference"

    def check(self, num_layers: int, used: bool) -> SearchConf:
        """The layer search's own rules (:meth:`vtw.search.SearchSettings.validate`), against ``L`` when the
        search will run (``used``)."""
        settings = SearchSettings(self.eta, self.min_layer, self.max_layer, self.direction)
        try:
            settings.validate(num_layers) if used else settings.check()
        except ValueError as e:
            raise ValueError(f"vtw.{e}") from None
        self.eta = float(settings.eta)
        self.tasks = None if self.tasks is None else _texts(self.tasks, "vtw.search.tasks")
        check_count(self.limit, "vtw.search.limit", 1)
        return self


@dataclass
class ChooseConf:
    tasks: list[str] | None = None  # calibration tasks; null: the dataset's tasks
    limit: int = 32  # calibration prompts per task
    max_new_tokens: int = 8  # length of the short greedy answers compared

    def check(self) -> ChooseConf:
        self.tasks = None if self.tasks is None else _texts(self.tasks, "vtw.choose.tasks")
        check_count(self.limit, "vtw.choose.limit", 1)
        check_count(self.max_new_tokens, "vtw.choose.max_new_tokens", 1)
        return self


@dataclass
class _VtwKeys:
    layer: Any = II("model.default_layer")  # null | int 0..L | auto
    positions: str = "keep"  # keep | compact: kept tokens keep their positions, or are renumbered (not on M-RoPE)
    method: Any = "vtw"  # a name of vtw.methods.METHODS | auto | [names]: the candidates of auto
    budget: float | None = None  # matched compute: the method's free parameter set for F x the full TFLOPs
    budget_limit: int = 32  # prompts per task the budget is matched on
    search: SearchConf = field(default_factory=SearchConf)
    choose: ChooseConf = field(default_factory=ChooseConf)

    @property
    def auto(self) -> bool:
        """``vtw.method=auto`` or a list of candidates."""
        return self.method == "auto" or isinstance(self.method, (list, tuple))

    def given(self) -> dict:
        """The method parameters given (not null), as configured."""
        return {k: getattr(self, k) for k in parameter_names() if getattr(self, k) is not None}

    def check(self, model: ModelConf, mode: str, video: bool) -> _VtwKeys:
        """``layer`` parsed (``None``, ``0..L`` or ``"auto"``); ``params`` (the method's parameters, converted),
        ``budget`` and, for ``auto``, ``candidates`` set; the method checked against the model's family."""
        self.layer = _layer(self.layer, model)
        check_choice(self.positions, POSITIONS, "vtw.positions")
        try:
            check_positions(self.positions, model.hf_config)
        except ValueError as e:
            raise ValueError(f"vtw.positions={self.positions} with model={model.name}: {e}") from None
        if self.budget is not None:
            self.budget = _budget(self.budget)
        method = None
        if self.auto:
            self.params, self.candidates = {}, _candidates(self, model)
        else:
            (self.params, method), self.candidates = _params(self, model), ()
        if mode == "choose" and not self.auto:
            raise ValueError(f"mode=choose chooses a method: give vtw.method=auto (or a list of candidates), not "
                             f"{self.method}")  # fmt: skip
        self.search.check(model.num_layers, used=self.layer == "auto" or mode == "search")
        self.choose.check()
        check_count(self.budget_limit, "vtw.budget_limit", 1)
        if method is not None:
            try:
                method.check_supported(model.hf_config, video=video)
            except ValueError as e:
                raise ValueError(f"vtw.method={self.method} with model={model.name}: {e}") from None
        return self


#: ``vtw``: the keys above plus every parameter of a registered method (``vtw.keep``, ``vtw.stride`` ...)
VtwConf = make_dataclass(
    "VtwConf",
    [(name, Any, field(default=None)) for name in parameter_names()],
    bases=(_VtwKeys,),
)
VtwConf.__module__ = __name__


def build_method(name: str, layer: int | None, params: dict):
    """``vtw.method`` with ``params`` at ``layer``: ``None`` is the full model for every method; ``layer`` is given to
    the methods that take one (``vtw``, ``fastv``, ``random_vision``, ``random``; ``pdrop`` has ``layers``)."""
    from ..methods import Withdrawal, make_method

    if layer is None:
        return Withdrawal()
    kw = dict(params)
    if "layer" in method_params(name):
        kw["layer"] = layer
    return make_method(name, **kw)


def _layer(value, model: ModelConf):
    from ..methods import check_layer

    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("null", "none"):
        return None
    try:
        return check_layer(value, model.num_layers)
    except ValueError as e:
        raise ValueError(
            f"vtw.layer={value!r} is not a valid layer for model {model.name} ({e}); allowed: null (no withdrawal), "
            f"an integer 0..{model.num_layers}, or auto"
        ) from None


def _budget(value) -> float:
    from ..flops.budget import check_budget

    try:
        return check_budget(value)
    except ValueError as e:
        raise ValueError(f"vtw.{e}") from None


def _params(vtw: _VtwKeys, model: ModelConf) -> tuple[dict, object]:
    """The parameters given to ``vtw.method``, converted to its fields' types and checked by the method, and the
    method resolved at ``vtw.layer`` (``None`` when the layer is not an integer)."""
    from ..methods import make_method

    name = check_choice(vtw.method, method_names(), "vtw.method")
    for key, value in vtw.given().items():
        if key not in method_params(name):
            raise ValueError(f"vtw.{key}={value!r} is not a parameter of vtw.method={name}; it takes: "
                             f"{', '.join(p for p in method_params(name) if p != 'keep_fn')}")  # fmt: skip
    try:
        params = method_args(name, vtw.given())
    except ValueError as e:
        raise ValueError(f"vtw.{e}") from None
    if vtw.layer == "auto" and name != "vtw":
        raise ValueError(f"vtw.layer=auto (the KL layer search) chooses VTW's K; vtw.method={name} needs a layer")
    if vtw.layer == "auto" and vtw.budget is not None:
        raise ValueError("vtw.layer=auto and vtw.budget both choose K: give one of them")
    try:
        make_method(name, **params)  # the parameters, whatever the layer (vtw.layer=null runs the full model)
        if not isinstance(vtw.layer, int):
            return params, None
        return params, build_method(name, vtw.layer, params).resolve(model.num_layers)
    except ValueError as e:
        raise ValueError(f"vtw.method={name}: {e}") from None


def _candidates(vtw: _VtwKeys, model: ModelConf) -> tuple[str, ...]:
    """``vtw.method=auto``: every registered method that can act on the model; ``vtw.method=[a, b]``: those, each
    of which must act on it."""
    given = vtw.method
    names = list(method_names()) if given == "auto" else [check_choice(n, method_names(), "vtw.method") for n in given]
    if not names:
        raise ValueError("vtw.method=[] names no candidate; give vtw.method=auto or a list of method names")
    if vtw.budget is None:
        raise ValueError("vtw.method=auto chooses at a compute budget: give vtw.budget=F (0 < F <= 1)")
    if vtw.layer == "auto":
        raise ValueError("vtw.layer=auto (the KL layer search) chooses VTW's K; vtw.method=auto needs a layer")
    if vtw.given():
        first = next(iter(vtw.given()))
        raise ValueError(f"vtw.{first} does not combine with vtw.method=auto: the budget sets each candidate")
    candidates = []
    for name in dict.fromkeys(names):
        try:
            if vtw.layer is not None:
                build_method(name, vtw.layer, {}).resolve(model.num_layers).check_supported(model.hf_config)
        except ValueError as e:
            if given != "auto":
                raise ValueError(f"vtw.method candidate {name} with model={model.name}: {e}") from None
            continue  # auto: the methods that cannot act on the model are no candidates
        candidates.append(name)
    return tuple(candidates)


@dataclass
class LoggerConf:
    name: str = MISSING  # wandb | none
    mode: str = "offline"
    project: str = "vtw"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_samples: bool = True

    def check(self) -> LoggerConf:
        check_choice(self.name, LOGGERS, "logger")
        if self.name == "none":
            self.mode = "disabled"
            return self
        check_choice(self.mode, WANDB_MODES, "logger.mode")
        check_text(self.project, "logger.project")
        self.tags = _texts(self.tags, "logger.tags", allow_empty=True)
        return self


@dataclass
class LauncherConf:
    name: str = MISSING


@dataclass
class FlopsConf:
    image_size: list[int] | None = None
    text_tokens: int = 64
    generated_tokens: int = 16
    video_frames: int = 0  # > 0: the sample is one video of that many frames instead of the image


@dataclass
class AnalyzeConf:
    limit: int = 32  # prompts per task of mode=analyze


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    vtw: VtwConf = field(default_factory=VtwConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    launcher: LauncherConf = field(default_factory=LauncherConf)
    mode: str = "eval"
    seed: int = 1234
    device: str = "auto"
    compare_baseline: Any = "auto"  # auto | true | false
    resume: bool = False
    resume_root: str = "outputs"
    bootstrap_iters: int = 0
    progress: bool = True
    flops: FlopsConf = field(default_factory=FlopsConf)
    analyze: AnalyzeConf = field(default_factory=AnalyzeConf)

    def check(self) -> Config:
        """Every group's own check, then what spans groups; returns the config, checked and normalised."""
        check_choice(self.mode, MODES, "mode")
        self.model.check()
        self.vtw.check(self.model, self.mode, video=self.mode == "flops" and bool(self.flops.video_frames))
        if self.compare_baseline not in COMPARE:
            raise ValueError(f"compare_baseline={self.compare_baseline!r} is not allowed; allowed: auto, true, false")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"device={self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
        _check_parallel(self.mode, self.model)
        self.dataset.check()
        self.logger.check()
        check_count(self.seed, "seed", 0)
        check_count(self.bootstrap_iters, "bootstrap_iters", 0)
        check_count(self.analyze.limit, "analyze.limit", 1)
        return self

    def reduction(self, layer: int | None):
        """The method object this job evaluates at ``layer`` (``None``: the full model, whatever the method; for
        ``vtw.method=auto``, once chosen: :meth:`with_method`)."""
        if self.vtw.auto and layer is not None:
            raise ValueError("vtw.method=auto: choose the method first (vtw.pipeline.choose.run_choose)")
        return build_method(self.vtw.method, layer, self.vtw.params)

    def with_vtw(self, **changes) -> Config:
        """A copy whose ``vtw`` group has ``changes`` (``method=`` the chosen one: no parameters, no candidates;
        ``layer="auto"`` for ``mode=search``); the other groups are shared."""
        vtw = copy.copy(self.vtw)
        for key, value in changes.items():
            setattr(vtw, key, value)
        if "method" in changes:
            vtw.params, vtw.candidates = {}, ()
        out = copy.copy(self)
        out.vtw = vtw
        return out


def _check_parallel(mode: str, model: ModelConf) -> None:
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


def register_schema() -> None:
    """Store :class:`Config` as ``vtw_schema`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
