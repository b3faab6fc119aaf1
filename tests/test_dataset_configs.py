"""Every ``conf/dataset`` config names tasks that the pinned lmms-eval's task index knows, and its
``primary_metric`` is a metric its task reports (the task YAML's ``metric_list``, a group's
``aggregate_metric_list``), read from the YAMLs themselves."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from vtw.pipeline.config import CONF_DIR, compose_config, validate_config

DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
VIDEO = {"videomme", "mvbench", "egoschema_subset", "nextqa", "vtw_synthvideo"}


@pytest.fixture(scope="module")
def task_manager():
    """lmms-eval's full task index plus the shipped local tasks (one scan of the ~2,000 task YAMLs, ~8 s)."""
    from lmms_eval.tasks import TaskManager

    from vtw.pipeline.resolvers import asset_path

    return TaskManager(include_path=[asset_path("tasks")], verbosity="ERROR")


def _raw_metrics(task_manager, name: str) -> list[str]:
    """The reference: the task's own YAML read with PyYAML, following ``include:`` templates by hand, unknown tags
    (``!function``) as plain strings; a group: its ``aggregate_metric_list``."""
    from pathlib import Path

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    entry = task_manager.task_index[name]
    path = Path(entry["yaml_path"])
    key = "aggregate_metric_list" if entry["type"] == "group" else "metric_list"
    while True:
        doc = yaml.load(path.read_text(), Loader=Loader)
        if key in doc:
            return [m["metric"] for m in doc[key]]
        path = path.parent / doc["include"]  # KeyError: no metric list anywhere, the test fails


def test_video_benchmarks_are_dataset_options():
    assert VIDEO <= set(DATASETS)


@pytest.mark.parametrize("dataset", DATASETS)
def test_primary_metric_is_one_its_task_reports(dataset, task_manager):
    from vtw.pipeline.evaluate import check_tasks, task_metrics

    spec = validate_config(compose_config(["model=llava-1.5-7b", f"dataset={dataset}"]))
    assert set(spec.dataset.tasks) <= set(task_manager.all_tasks)
    primary = spec.dataset.primary_metric
    if primary is None:  # the pipeline takes the first metric of the first task
        assert OmegaConf.load(CONF_DIR / "dataset" / f"{dataset}.yaml").include_path, dataset  # local tasks only
        primary = f"{spec.dataset.tasks[0]}/{_raw_metrics(task_manager, spec.dataset.tasks[0])[0]}"
    task, metric = primary.split("/")
    assert task in spec.dataset.tasks
    assert metric in _raw_metrics(task_manager, task)
    assert task_metrics(task_manager, task) == tuple(_raw_metrics(task_manager, task))
    check_tasks(task_manager, spec.dataset.tasks, primary)
    with pytest.raises(ValueError) as info:
        check_tasks(task_manager, spec.dataset.tasks, f"{task}/{metric}_typo")
    assert f"{task}/{metric}_typo" in str(info.value) and repr(metric) in str(info.value)


def test_a_group_without_an_aggregate_reports_no_metric(task_manager):
    """lmms-eval's own ``mvbench`` group has no aggregate (hence the shipped ``vtw_mvbench``); its tasks do."""
    from vtw.pipeline.evaluate import task_metrics

    assert task_metrics(task_manager, "mvbench") == ()
    assert task_metrics(task_manager, "mvbench_moving_direction") == ("mvbench_accuracy",)
    sub = yaml.safe_load((CONF_DIR.parent / "vtw/assets/tasks/vtw_mvbench/vtw_mvbench.yaml").read_text())["task"]
    mv = yaml.load(open(task_manager.task_index["mvbench"]["yaml_path"]), Loader=yaml.SafeLoader)["task"]
    assert sorted(sub) == sorted(mv)
