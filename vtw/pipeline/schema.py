"""The schema of the composed config, as OmegaConf structured configs.

``conf/config.yaml`` starts its defaults list with ``vtw_schema`` (registered here in Hydra's ConfigStore), so every
group option (``conf/model/*.yaml`` ...) and every command-line override is merged into these typed nodes: a key
that does not exist (``model.batchsize=8``) or a value of the wrong type (``model.batch_size=eight``) fails at
composition, with Hydra's message naming the key and the value. What the types cannot say (allowed choices, ranges,
``vtw.layer <= L``, a metric of one of the tasks, paths that exist) is checked by one function,
:func:`vtw.pipeline.config.validate_config`, before any model loads.

Values live in the YAML files; the defaults here are for keys a YAML file leaves out (none of the shipped ones do,
except the ``none`` logger, which has only its name, and ``model.device_map`` / ``model.max_memory``, null unless
given on the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II, MISSING

SCHEMA_NAME = "vtw_schema"


@dataclass
class ModelConf:
    name: str = MISSING
    pretrained: str = MISSING  # hub id or local directory (from_pretrained)
    config: str | None = None  # config read without weights (shipped name, hub id, path); null: pretrained's
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    batch_size: int = MISSING
    attn_implementation: str = "sdpa"  # sdpa | eager
    max_new_tokens: int = 128
    chat_template: str | None = None
    max_frames_num: int = 8
    default_layer: int | None = None  # vtw.layer when none is given
    kl_eta: float = 0.003  # KL threshold of the layer search
    device_map: Any = None  # model parallel in one process: null | auto | balanced | balanced_low_0 | sequential | dict
    max_memory: Any = None  # with device_map: {device: size}, e.g. {0: 20GiB, 1: 20GiB, cpu: 64GiB}


@dataclass
class DatasetConf:
    name: str = MISSING
    tasks: list[str] = MISSING
    include_path: list[str] = field(default_factory=list)
    limit: Any = None  # null | int >= 1 | fraction in (0, 1)
    primary_metric: str | None = None


@dataclass
class SearchConf:
    tasks: list[str] | None = None
    limit: int = 20
    eta: float = II("model.kl_eta")
    min_layer: int | None = None
    max_layer: int | None = None
    direction: str = "reference"


@dataclass
class ChooseConf:
    tasks: list[str] | None = None  # calibration tasks; null: the dataset's tasks
    limit: int = 32  # calibration prompts per task
    max_new_tokens: int = 8  # length of the short greedy answers compared


@dataclass
class VtwConf:
    layer: Any = II("model.default_layer")  # null | int 0..L | auto
    positions: str = "keep"  # keep | compact: kept tokens keep their positions, or are renumbered (not on M-RoPE)
    method: Any = "vtw"  # a name of vtw.methods.METHODS | auto | [names]: the candidates of auto
    keep: Any = None  # fastv / random_vision: share of vision tokens kept; pdrop: one share per stage
    layers: Any = None  # pdrop: stage layers (null: the paper's 8, 16, 24 of 32 scaled to L)
    seed: int | None = None  # random_vision / random
    stride: int | None = None  # pool: window rows (2: 2x2, 576 -> 144 tokens per LLaVA-1.5 image)
    stride_cols: int | None = None  # pool: window columns (null: = stride; stride=1 stride_cols=2 keeps half)
    dominant: int | None = None  # visionzip: dominant tokens per image / frame / crop (54 of LLaVA-1.5's 54+10)
    contextual: int | None = None  # visionzip: contextual (merged) tokens per image / frame / crop
    recycle: float | None = None  # sparsevlm: share of each stage's pruned tokens recycled into aggregates
    clusters: float | None = None  # sparsevlm: aggregates per recycled token
    plus: bool | None = None  # prumerge: PruMerge+ (adds spatially uniform samples)
    neighbours: int | None = None  # prumerge: nearest patches each kept one absorbs (32)
    pivots: int | None = None  # dart: pivot tokens among the image and among the text tokens (4 each)
    important: float | None = None  # vispruner: share of the kept tokens chosen by importance (1: FasterVLM)
    threshold: float | None = None  # dycoke: cosine similarity above which a later frame's token is dropped
    window: int | None = None  # dycoke: frames per window, compared with an earlier frame of it (4)
    budget: float | None = None  # matched compute: the method's free parameter set for F x the full TFLOPs
    budget_limit: int = 32  # prompts per task the budget is matched on
    search: SearchConf = field(default_factory=SearchConf)
    choose: ChooseConf = field(default_factory=ChooseConf)


@dataclass
class LoggerConf:
    name: str = MISSING  # wandb | none
    mode: str = "offline"
    project: str = "vtw"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_samples: bool = True


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


def register_schema() -> None:
    """Store :class:`Config` as ``vtw_schema`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
