"""Config groups compose and validate; every bad value is a ValueError naming it and the allowed ones, raised
before any model loads (the 7B models here have no weights on this machine at all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vtw.pipeline.config import CONF_DIR, compose_config, config_hash, resolved_config, validate_config
from vtw.pipeline.resolvers import layer_tag, register_resolvers, slug

ROOT = Path(__file__).resolve().parents[1]
HF_CONFIGS = ROOT / "vtw" / "assets" / "hf_configs"
MODELS = sorted(
    p.stem for p in (CONF_DIR / "model").glob("*.yaml") if not p.stem.startswith("tiny-")
)  # shipped configs
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))


def test_config_groups_hold_the_required_options():
    required_models = {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-onevision-7b", "qwen2-vl-7b"}
    required_models |= {"qwen2.5-vl-7b", "video-llava-7b", "llava-next-video-7b", "tiny-llava", "tiny-video-llava"}
    assert required_models <= {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    required_data = {"mme", "scienceqa_img", "gqa", "pope", "textvqa_val", "mmmu_val", "mmbench_en_dev", "seedbench"}
    required_data |= {"videomme", "mvbench", "egoschema_subset", "nextqa", "vtw_synthvideo"}
    assert required_data | {"synthvqa"} <= set(DATASETS)
    assert {p.stem for p in (CONF_DIR / "logger").glob("*.yaml")} >= {"wandb", "none"}
    assert (CONF_DIR / "launcher" / "local.yaml").is_file()


@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_model_validates_with_its_own_layer_count(model):
    hf = json.loads((HF_CONFIGS / f"{model}.json").read_text())
    n_layers = (hf.get("text_config") or hf)["num_hidden_layers"]
    spec = validate_config(compose_config([f"model={model}", "vtw.layer=null"]))
    assert spec.model.num_layers == n_layers and spec.vtw.layer is None
    assert spec.model.family == hf["model_type"]
    spec = validate_config(compose_config([f"model={model}", f"vtw.layer={n_layers}"]))
    assert spec.vtw.layer == n_layers
    with pytest.raises(ValueError, match=rf"vtw.layer={n_layers + 1}.*{model}.*0\.\.{n_layers}.*auto"):
        validate_config(compose_config([f"model={model}", f"vtw.layer={n_layers + 1}"]))
    assert (
        validate_config(compose_config([f"model={model}"])).vtw.layer
        == OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").default_layer
    )


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_validates(dataset):
    spec = validate_config(compose_config(["model=llava-1.5-7b", f"dataset={dataset}"]))
    assert spec.dataset.tasks and all(isinstance(t, str) for t in spec.dataset.tasks)
    if spec.dataset.primary_metric:
        assert spec.dataset.primary_metric.split("/")[0] in spec.dataset.tasks


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["model=gpt-5"], ["gpt-5", "llava-1.5-7b", "qwen2-vl-7b"]),
        (["dataset=imagenet"], ["imagenet", "pope", "mme"]),
        (["logger=tensorboard"], ["tensorboard", "wandb", "none"]),
        (["model=llava-1.5-7b", "vtw.layer=-1"], ["-1", "0..32"]),
        (["model=llava-1.5-7b", "vtw.layer=sixteen"], ["sixteen", "0..32", "auto"]),
        (["model=qwen2-vl-7b", "vtw.layer=29"], ["29", "0..28"]),
        (["model=llava-1.5-7b", "vtw.method=no_such_method"], ["no_such_method", "vtw", "fastv", "pdrop", "random"]),
        (["model=llava-1.5-7b", "mode=train"], ["train", "eval", "flops", "search"]),
        (["model=llava-1.5-7b", "logger.mode=cloud"], ["cloud", "online", "offline", "disabled"]),
        (["model=llava-1.5-7b", "device=tpu"], ["tpu", "cpu", "cuda"]),
        (["model=llava-1.5-7b", "compare_baseline=maybe"], ["maybe", "auto"]),
        (["model=llava-1.5-7b", "model.dtype=int4"], ["int4", "bfloat16"]),
        (["model=llava-1.5-7b", "model.batch_size=0"], ["batch_size", ">= 1"]),
        (["model=llava-1.5-7b", "dataset.limit=-3"], ["limit", "-3"]),
        (["model=llava-1.5-7b", "dataset.tasks=[]"], ["dataset.tasks"]),
        (["model=llava-1.5-7b", "dataset.include_path=[/no/such/dir]"], ["/no/such/dir"]),
        (["model=llava-1.5-7b", "dataset.primary_metric=gqa/exact_match"], ["gqa/exact_match", "vtw_synthvqa"]),
        (["model=llava-1.5-7b", "model.pretrained=/no/such/model"], ["/no/such/model"]),
        (["model=llava-1.5-7b", "model.config=not-a-model"], ["not-a-model", "llava-1.5-7b"]),
        (["model=llava-1.5-7b", "vtw.layer=auto", "vtw.search.min_layer=40"], ["min_layer", "31"]),
        (["model=llava-1.5-7b", "vtw.method=pool", "vtw.stride=0"], ["pool stride", ">= 1", "got 0"]),
        (["model=llava-1.5-7b", "vtw.method=pool", "vtw.layer=null", "vtw.stride=0"], ["pool stride", "got 0"]),
        (["model=llava-1.5-7b", "vtw.method=pool", "vtw.dominant=3"], ["vtw.dominant=3", "stride, stride_cols"]),
        (["model=llava-1.5-7b", "vtw.method=visionzip", "vtw.dominant=-1"], ["visionzip", "-1"]),
    ],
)
def test_bad_values_name_the_value_and_the_allowed_ones(overrides, needles):
    with pytest.raises(ValueError) as info:
        validate_config(compose_config(overrides))
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def test_auto_layer_and_search_settings_are_valid_values():
    spec = validate_config(compose_config(["model=llava-1.5-7b", "vtw=auto"]))
    assert spec.vtw.layer == "auto" and spec.vtw.search.eta == 0.003 and spec.vtw.search.min_layer is None
    assert validate_config(compose_config(["model=llava-1.5-13b", "vtw=auto"])).vtw.search.eta == 0.0005
    assert validate_config(compose_config(["model=llava-1.5-7b", "vtw=baseline"])).vtw.layer is None


def test_unknown_task_is_named_with_suggestions(tmp_path):
    from test_lmms_fixtures import build_tiny_tasks

    from vtw.pipeline.evaluate import build_task_manager, check_tasks
    from vtw.pipeline.schema import DatasetConf

    names = build_tiny_tasks(tmp_path)
    ds = DatasetConf(name="x", tasks=[names["gen"]], include_path=[str(tmp_path)]).check()
    tm = build_task_manager(ds)
    check_tasks(tm, [names["gen"]])
    with pytest.raises(ValueError, match=r"'vtwtest_gne' \(did you mean: vtwtest_gen"):
        check_tasks(tm, ["vtwtest_gne"])


def test_run_py_rejects_bad_values_before_loading(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "run.py"), "logger=none", f"hydra.run.dir={tmp_path}/run"]
    p = subprocess.run([*base, "model=gpt-5"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode != 0 and "gpt-5" in p.stderr and "llava-1.5-7b" in p.stderr
    p = subprocess.run(
        [*base, "model=llava-1.5-7b", "vtw.layer=33"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode != 0 and "vtw.layer=33" in p.stderr and "0..32" in p.stderr
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["status"] == "failed" and "0..32" in job["error"]


def test_resolvers_and_identity():
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        a = compose("config", overrides=["model=llava-1.5-7b"], return_hydra_config=True)
        b = compose("config", overrides=["model=llava-1.5-7b"], return_hydra_config=True)
        run_a = a.hydra.run.dir
        assert run_a == a.hydra.run.dir  # one launch: one uid
        assert run_a != b.hydra.run.dir  # two launches in the same second: different dirs
        assert a.hydra.run.dir.startswith("outputs/run/") and b.hydra.sweep.dir.startswith("outputs/multirun/")
        assert a.hydra.job.chdir is False
    assert slug("vtw.layer=8,model=/a/b c") == "vtw.layer=8,model=_a_b_c" and slug("") == "default"
    assert len(slug("x" * 500)) <= 80
    assert (layer_tag(None), layer_tag(12), layer_tag("auto")) == ("base", "K12", "auto")
    c1 = resolved_config(compose_config(["model=llava-1.5-7b", "vtw.layer=8"]))
    c2 = resolved_config(compose_config(["model=llava-1.5-7b", "vtw.layer=8", "logger=none", "resume=true"]))
    c3 = resolved_config(compose_config(["model=llava-1.5-7b", "vtw.layer=9"]))
    assert config_hash(c1) == config_hash(c2) != config_hash(c3)


# ------------------------------------------------------------------------------------------ the schema
@pytest.mark.parametrize(
    ("override", "needles"),
    [("model.batchsize=8", ["batchsize"]), ("model.batch_size=eight", ["eight", "batch_size"]),
     ("vtw.search.limit=many", ["many", "limit"]), ("dataset.tasks=gqa", ["dataset.tasks", "gqa"])],
)  # fmt: skip
def test_schema_rejects_unknown_keys_and_wrong_types_at_composition(override, needles):
    with pytest.raises(ValueError) as info:
        compose_config([override])
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


@pytest.mark.parametrize("group", ["model", "dataset"])
def test_every_group_option_sets_every_schema_key(group):
    """Values live in the YAML files: each option of these groups sets every key of its schema node, so no option
    silently takes a default from elsewhere."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from vtw.pipeline.config import CONF_DIR
    from vtw.pipeline.schema import Config

    node = {f.name: f for f in fields(Config)}[group].default_factory
    keys = {f.name for f in fields(node)}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        assert set(OmegaConf.load(path)) == keys, path.name


def test_plain_dict_gets_the_schema_defaults():
    """validate_config on plain data (as a job re-validates its resolved config): a key left out takes the schema's
    default, a wrong type or a missing mandatory value is a ValueError naming it."""
    from vtw.pipeline.config import resolved_config

    data = resolved_config(compose_config(["model=llava-1.5-7b"]))
    del data["seed"], data["vtw"]["search"]["limit"]
    spec = validate_config(data)
    assert spec.seed == 1234 and spec.vtw.search.limit == 20
    data["model"]["batch_size"] = "eight"
    with pytest.raises(ValueError, match="eight"):
        validate_config(data)
    data["model"]["batch_size"] = 8
    del data["model"]["name"]
    with pytest.raises(ValueError, match="model.name"):
        validate_config(data)
