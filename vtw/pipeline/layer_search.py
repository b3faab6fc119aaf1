"""``vtw.layer=auto`` and ``mode=search``: the KL layer search (:mod:`vtw.search`) on lmms-eval task samples,
cached so that a sweep, or the tasks of a SLURM array, run one search and share it.

* Samples: the first ``limit`` documents of each search task (the reference used the first 20 of scienceqa_img),
  turned into model inputs exactly as the ``vtw`` lmms-eval model prepares them for evaluation (its processor, chat
  template and prompt layout), one sample per forward.
* Cache: ``<cache_dir>/<key>.json`` where the key hashes everything the result depends on (the checkpoint, dtype,
  tasks, limit, eta, candidate range, divergence direction, and the versions of vtw and transformers). A lock file
  next to it (``fcntl.flock``) makes concurrent jobs wait for the first one's search instead of repeating it. The
  cache dir is ``$VTW_CACHE_DIR`` if set, else ``outputs/.cache/layer_search``.
* Outputs in the job dir: ``layer_search.json`` (result, key fields, whether the cache was reused) and
  ``layer_search.png`` (mean KL per candidate layer, eta and the chosen K marked).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json
from ..methods import Withdrawal
from ..search import SearchResult, SearchSettings, search_layer

DEFAULT_CACHE_DIR = Path("outputs/.cache/layer_search")


@dataclass
class SearchOutcome:
    """A search result with where it came from."""

    result: SearchResult
    key: str
    key_fields: dict
    cache_file: Path
    reused: bool

    def to_dict(self) -> dict:
        return {
            **self.result.to_dict(),
            "cache_key": self.key,
            "cache_file": str(self.cache_file),
            "reused_cache": self.reused,
            "key_fields": self.key_fields,
        }


def cache_dir() -> Path:
    return Path(os.environ.get("VTW_CACHE_DIR", DEFAULT_CACHE_DIR))


def cache_key(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_json(fields: dict, compute, directory: Path) -> tuple[dict, str, Path, bool]:
    """``(result, key, file, reused)``: the result stored for ``fields`` in ``directory``, or ``compute()`` (a
    JSON-able dict) stored there; under a lock, so concurrent jobs with the same fields compute once."""
    directory = Path(directory)
    key = cache_key(fields)
    target = directory / f"{key}.json"
    with _locked(directory / f"{key}.lock"):
        if target.exists():
            return json.loads(target.read_text())["result"], key, target, True
        atomic_write_json(target, {"key_fields": fields, "result": compute()})
        result = json.loads(target.read_text())["result"]  # as a later reuse reads it (tuples as lists)
    return result, key, target, False


def cached_search(fields: dict, compute, directory: Path | None = None) -> SearchOutcome:
    """The cached result for ``fields``, or ``compute()`` (a :class:`SearchResult`) stored under the lock."""
    directory = Path(directory) if directory is not None else cache_dir()
    stored, key, target, reused = cached_json(fields, lambda: compute().to_dict(), directory)
    return SearchOutcome(SearchResult.from_dict(stored), key, fields, target, reused=reused)


def task_leaves(task_manager, names) -> list[tuple[str, object]]:
    """``[(task name, lmms-eval task), ...]`` for ``names`` (groups expanded to their tasks, in order)."""
    from lmms_eval.tasks import get_task_dict

    def leaves(d):
        for name, value in d.items():
            if isinstance(value, dict):
                yield from leaves(value)
            else:
                yield getattr(name, "group_name", name), value

    return list(leaves(get_task_dict(list(names), task_manager)))


def task_samples(lm, task_manager, tasks, limit: int) -> Iterator[dict]:
    """Model inputs (one sample each) for the first ``limit`` documents of every task, prepared by ``lm``.

    Args:
        lm: a :class:`vtw.lmms.model.VTWModel` (its :class:`vtw.lmms.inputs.InputBuilder`, ``lm.inputs``).
        task_manager: an lmms-eval ``TaskManager`` that knows ``tasks``.
    """
    found = task_leaves(task_manager, tasks)
    if not found:
        raise ValueError(f"the layer search found no tasks among {list(tasks)}")
    for _name, task in found:
        docs = task.eval_docs
        for i in range(min(limit, len(docs))):
            doc = docs[i]
            yield lm.inputs.sample(str(task.doc_to_text(doc)), task.doc_to_visual, doc)


def search_key_fields(spec, tasks, settings: SearchSettings) -> dict:
    import transformers

    from .. import __version__

    return {
        "model": spec.model.pretrained,
        "dtype": spec.model.dtype,
        "tasks": sorted(tasks),
        "limit": spec.vtw.search.limit,
        "eta": settings.eta,
        "min_layer": settings.min_layer,
        "max_layer": settings.max_layer,
        "direction": settings.direction,
        "vtw": __version__,
        "transformers": transformers.__version__,
    }


def run_search(spec, lm, task_manager, out_dir: str | Path | None = None) -> SearchOutcome:
    """Search (or reuse the cached search) for ``spec``; write ``layer_search.json``/``.png`` into ``out_dir``."""
    tasks = list(spec.vtw.search.tasks or spec.dataset.tasks)
    settings = SearchSettings(
        eta=spec.vtw.search.eta,
        min_layer=spec.vtw.search.min_layer,
        max_layer=spec.vtw.search.max_layer,
        direction=getattr(spec.vtw.search, "direction", "reference"),
    ).validate(lm.num_layers)
    fields = search_key_fields(spec, tasks, settings)

    def compute() -> SearchResult:
        previous = lm.method
        lm.set_method(Withdrawal())  # the search compares against the full model
        try:
            return search_layer(lm.model, task_samples(lm, task_manager, tasks, spec.vtw.search.limit), settings)
        finally:
            lm.set_method(previous)

    outcome = cached_search(fields, compute)
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "layer_search.json", outcome.to_dict())
        plot_search(outcome.result, out_dir / "layer_search.png")
    return outcome


def plot_search(result: SearchResult, path: str | Path) -> Path:
    """Mean KL per candidate layer (log scale), the threshold eta and the chosen K; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = [k for k in sorted(result.kl) if k < result.num_layers]
    values = [max(result.kl[k], 1e-12) for k in layers]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.plot(layers, values, marker="o", label="mean KL over samples")
    ax.axhline(result.eta, color="tab:red", linestyle="--", label=f"eta = {result.eta:g}")
    if result.layer is not None:
        ax.axvline(result.layer, color="tab:green", linestyle=":", label=f"chosen K = {result.layer}")
    ax.set_yscale("log")
    ax.set_xlabel("withdrawal layer K")
    ax.set_ylabel(f"KL ({'P_K || P_full' if result.direction == 'reference' else 'P_full || P_K'})")
    title = (
        "no layer meets eta: no withdrawal"
        if result.layer is None
        else f"K = {result.layer} of L = {result.num_layers}"
    )
    ax.set_title(f"Layer search: {title} ({result.num_samples} samples)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
