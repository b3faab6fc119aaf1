"""``vtw.method=auto`` and ``mode=choose``: which method keeps the model's answers at ``vtw.budget``
(:func:`vtw.choose.choose_method`) on calibration prompts, cached so that a sweep's jobs choose once per model and
budget.

* Calibration prompts: the first ``vtw.choose.limit`` documents of each task (``vtw.choose.tasks``, default the
  dataset's) from the task's **validation split** where it has one that is not the evaluated split (the embedded
  ``vtw_synthvqa`` ships 64 validation items whose seeds no test item shares); otherwise the documents **after the
  evaluated ones** (after ``dataset.limit``); a task with neither (every document evaluated, no other split) has
  none, and a calibration set without any prompt is an error before the weights load. Prepared exactly as the
  evaluation prepares its prompts (:meth:`vtw.lmms.inputs.InputBuilder.sample`). ``choose.json`` says which source
  each task used.
* Candidates: every registered method that can act on the model (``vtw.method=auto``), or the listed ones
  (``vtw.method=[fastv,pdrop]``); each at ``vtw.layer`` where it takes a layer, its free parameter set by the budget.
* Cache: ``<cache>/choose/<key>.json``, the key hashing what the choice depends on (checkpoint, dtype, tasks, limit,
  the documents' source, budget, layer, positions, candidates, answer length, the rule, vtw and transformers
  versions); a lock
  makes concurrent jobs wait for the first one's choice. ``$VTW_CACHE_DIR`` or ``outputs/.cache``.
* Outputs in the job dir: ``choose.json`` (the table, the choice, the rule, the cost, whether the cache was reused)
  and ``choose.png`` (each candidate's answer agreement with its 95% interval, and its first-token KL).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..choose import Choice, choose_method
from ..io import atomic_write_json
from .layer_search import cached_json, task_leaves
from .schema import build_method

log = logging.getLogger("vtw")


def calibration_docs(task_manager, names, limit: int, evaluated) -> tuple[list[tuple[object, object]], dict]:
    """``([(task, doc), ...], {task name: source})``: the calibration documents of the module docstring.

    Args:
        evaluated: ``dataset.limit`` (``None``: every document is evaluated; an int: the first that many; a float
            below 1: that share, as lmms-eval reads it).
    """
    docs, sources = [], {}
    for name, task in task_leaves(task_manager, names):
        eval_split = getattr(task.config, "test_split", None) or getattr(task.config, "validation_split", None)
        validation = getattr(task.config, "validation_split", None)
        if validation and validation != eval_split and task.has_validation_docs():
            chosen, source = list(task.validation_docs())[:limit], f"{validation} split"
        else:
            all_docs = task.eval_docs
            first = len(all_docs) if evaluated is None else _evaluated_count(evaluated, len(all_docs))
            chosen, source = [all_docs[i] for i in range(first, min(first + limit, len(all_docs)))], (
                f"documents {first}.. after the evaluated ones")  # fmt: skip
        sources[name] = {"source": source, "documents": len(chosen)}
        docs += [(task, doc) for doc in chosen]
    if not docs:
        raise ValueError(
            f"vtw.method=auto has no calibration prompts in {list(names)}: no validation split, and every document is "
            "evaluated; set dataset.limit below the task's size or give vtw.choose.tasks with a validation split"
        )
    return docs, sources


def _evaluated_count(limit, total: int) -> int:
    if isinstance(limit, float) and limit < 1:
        return int(total * limit)
    return min(int(limit), total)


def choose_fields(spec, layer: int, sources: dict) -> dict:
    import transformers

    from .. import __version__

    return {
        "model": spec.model.pretrained,
        "dtype": spec.model.dtype,
        "tasks": sorted(sources),
        "sources": sources,
        "limit": spec.vtw.choose.limit,
        "budget": spec.vtw.budget,
        "layer": layer,
        "positions": spec.vtw.positions,
        "candidates": list(spec.vtw.candidates),
        "max_new_tokens": spec.vtw.choose.max_new_tokens,
        "rule": Choice.rule,
        "vtw": __version__,
        "transformers": transformers.__version__,
    }


def prepare_choice(spec, task_manager) -> tuple[list, dict]:
    """The calibration documents and their sources (before the weights load: an empty set fails here)."""
    names = spec.vtw.choose.tasks or spec.dataset.tasks
    return calibration_docs(task_manager, names, spec.vtw.choose.limit, spec.dataset.limit)


def run_choose(spec, lm, layer: int, docs: list, sources: dict, out_dir: str | Path | None = None) -> dict:
    """Choose (or reuse the cached choice) for ``spec`` at ``layer``; write ``choose.json`` / ``.png`` into
    ``out_dir``. Returns what ``choose.json`` holds (``choice``: :meth:`vtw.choose.Choice.to_dict`)."""
    fields = choose_fields(spec, layer, sources)

    def compute() -> dict:
        samples = [lm.inputs.sample(str(task.doc_to_text(doc)), task.doc_to_visual, doc) for task, doc in docs]
        prompts = [lm.meter.prompt(x) for x in samples]
        candidates = [build_method(name, layer, {}) for name in spec.vtw.candidates]
        previous = lm.method
        lm.set_method(build_method("vtw", None, {}))  # the choice runs each candidate on the untouched model
        try:
            choice = choose_method(lm.model, samples, prompts, candidates, spec.vtw.budget,
                                   spec.vtw.choose.max_new_tokens, spec.vtw.positions)  # fmt: skip
        finally:
            lm.set_method(previous)
        return choice.to_dict()

    stored, key, path, reused = cached_json(fields, compute, _cache_dir())
    outcome = {"choice": stored, "cache_key": key, "cache_file": str(path), "reused_cache": reused,
               "key_fields": fields}  # fmt: skip
    choice = Choice.from_dict(stored)
    log.info("vtw.method=auto at budget %.3g: %s (%s; %d prompts%s)", choice.budget, choice.chosen, choice.rule,
             choice.prompts, ", cached" if reused else "")  # fmt: skip
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "choose.json", outcome)
        plot_choice(choice, Path(out_dir) / "choose.png")
    return outcome


def _cache_dir() -> Path:
    root = os.environ.get("VTW_CACHE_DIR")
    return Path(root) / "choose" if root else Path("outputs/.cache/choose")


def choice_table(choice: Choice) -> list[list]:
    """The rows printed and logged: method, setting, budget share, agreement [95%], top-1 [95%], KL [95%], chosen."""
    rows = []
    for s in choice.scores:
        rows.append([s.name, s.label, round(s.budget_ratio, 4), round(s.agree, 4),
                     f"[{s.agree_ci[0]:.3f}, {s.agree_ci[1]:.3f}]", round(s.top1, 4),
                     f"[{s.top1_ci[0]:.3f}, {s.top1_ci[1]:.3f}]", float(f"{s.kl:.4g}"),
                     f"[{s.kl_ci[0]:.3g}, {s.kl_ci[1]:.3g}]", s.name == choice.chosen])  # fmt: skip
    return rows


TABLE_COLUMNS = ["method", "setting", "budget_share", "agreement", "agreement_95", "top1", "top1_95", "kl", "kl_95",
                 "chosen"]  # fmt: skip


def plot_choice(choice: Choice, path: Path) -> Path:
    """Each candidate's answer agreement with its 95% interval (left) and first-token KL (right); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in choice.scores]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.6), sharey=True)
    y = list(range(len(names)))
    agree = [s.agree for s in choice.scores]
    err = [[s.agree - s.agree_ci[0] for s in choice.scores], [s.agree_ci[1] - s.agree for s in choice.scores]]
    colors = ["tab:green" if n == choice.chosen else "tab:blue" for n in names]
    left.barh(y, agree, xerr=err, color=colors, capsize=3)
    left.set_yticks(y, names)
    left.set_xlim(0, 1)
    left.set_xlabel("answer agreement with the full model (95% interval)")
    right.barh(y, [max(s.kl, 1e-9) for s in choice.scores], color=colors)
    right.set_xscale("log")
    right.set_xlabel("first-token KL(P_full || P) (nats)")
    fig.suptitle(f"vtw.method=auto at budget {choice.budget:g}: {choice.chosen} ({choice.prompts} prompts)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def print_choice(outcome: dict, out_dir: Path, console=None) -> None:
    """The choice as a rich table (the chosen method marked), its cost, and where the files are."""
    from rich.table import Table

    from .report import make_console

    choice = Choice.from_dict(outcome["choice"])
    table = Table(title=f"vtw.method=auto at budget {choice.budget:g} ({choice.prompts} calibration prompts)")
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for row in choice_table(choice):
        table.add_row(*("*" if v is True else "" if v is False else str(v) for v in row))
    console = console or make_console()
    console.print(table)
    cost = choice.cost
    console.print(
        f"chosen: {choice.chosen} (rule: {choice.rule}); cost {cost['prefills_per_prompt']:.2f} prefills "
        f"per prompt (lone runs with their own baseline: {cost['lone_runs_prefills_per_prompt']:.2f}); "
        f"{'cached' if outcome['reused_cache'] else 'computed'}; wrote {out_dir}/choose.json, choose.png"
    )
