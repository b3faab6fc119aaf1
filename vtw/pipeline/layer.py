"""The withdrawal layer a job evaluates: ``vtw.layer`` as given, or found by the KL layer search.

:func:`resolve_layer` is the one place the pipeline turns ``vtw.layer`` into ``K``; ``vtw.layer=auto`` and
``mode=search`` both come through here (the search itself, with its cache: :mod:`vtw.pipeline.layer_search`).
"""

from __future__ import annotations

from pathlib import Path

from .schema import Config


def resolve_layer(spec: Config, *, lm=None, task_manager=None, out_dir: str | Path | None = None) -> int | None:
    """``K`` for this job.

    Args:
        spec: the validated run; ``spec.vtw.layer`` is ``None``, an int in ``[0, L]`` or ``"auto"``.
        lm: the loaded ``vtw`` lmms-eval model (:class:`vtw.lmms.model.VTWModel`), used by the search.
        task_manager: the lmms-eval ``TaskManager`` that knows the search tasks.
        out_dir: the job directory (the search writes ``layer_search.json`` / ``.png`` there).

    Returns:
        ``None`` (no withdrawal) or ``K``. For ``"auto"``: the search's choice, ``None`` when no candidate meets
        ``eta`` (the search reports that; it never guesses).
    """
    if spec.vtw.layer != "auto":
        return spec.vtw.layer
    if lm is None or task_manager is None:
        raise ValueError("vtw.layer=auto needs the loaded model and the task manager to run the layer search")
    from .layer_search import run_search

    return run_search(spec, lm, task_manager, out_dir).result.layer
