"""Check a whole sweep before any job runs (``python run.py -m ...``): every point Hydra's sweeper will make is
composed and validated with the checks a job makes before it loads weights (:func:`vtw.pipeline.config.validate_config`);
if any point is invalid the sweep stops with one line per bad point, nothing runs and nothing is submitted, exit
status 1. Registered in ``conf/config.yaml`` as the Hydra callback ``hydra.callbacks.sweep_check``;
``hydra.callbacks.sweep_check.enabled=false`` turns it off (each bad point then fails alone, recorded in its
``job.json``, while the others run).

What a job can only find out by running (an unknown lmms-eval task, a checkpoint that does not load, memory) is left
to the job: the sweep goes on past such a failure and its summary marks it."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vtw")


def sweep_points(arguments: Sequence[str], params: Mapping[str, str] | None = None) -> list[list[str]] | None:
    """The points (override lists, in Hydra's job order) that Hydra's basic sweeper makes of the command line's
    ``arguments`` and the sweeper's ``params`` (``hydra.sweeper.params``, applied first): the cartesian product of the
    listed values (``a=1,2``, ``range(...)``, ``choice(...)``), a key given twice keeping its place and its last value.
    ``None`` where a sweep is of another kind (``glob(...)``, intervals), which needs the sweeper's own expansion: the
    check then leaves the points to the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
        values: dict[str, list[str]] = {}
        for override in parsed:
            key = override.get_key_element()
            if not override.is_sweep_override():
                values[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                return None
    except Exception as e:  # a glob needs the config loader; Hydra's own sweeper reports real syntax errors
        log.debug("sweep check: not expanding %s (%s)", lines, e)
        return None
    return [list(point) for point in itertools.product(*values.values())]


def point_errors(points: Sequence[Sequence[str]], check: Callable[[list[str]], object]) -> list[str]:
    """One line per point that ``check`` (compose + validate) refuses with a ``ValueError``: ``#<job number>
    <the point's swept overrides>: <the error>``. A point whose check fails otherwise is left to its job (logged)."""
    varying = {i for i in range(len(points[0]) if points else 0) if len({p[i] for p in points}) > 1}
    errors = []
    for num, point in enumerate(points):
        try:
            check(list(point))
        except ValueError as e:
            named = " ".join(o for i, o in enumerate(point) if i in varying) or " ".join(point)
            errors.append(f"#{num} {named}: {str(e).splitlines()[0]}")
        except Exception as e:  # not a config error: the job will meet it and record it
            log.warning(
                "sweep check: point #%d could not be checked (%s: %s); left to its job", num, type(e).__name__, e
            )
    return errors


def check_point(overrides: list[str], config_name: str = "config") -> None:
    """Compose one point inside the running Hydra app and validate it as :func:`vtw.pipeline.job.run_job` does."""
    from .config import compose_in_app, resolved_config, validate_config

    validate_config(resolved_config(compose_in_app(overrides, config_name)))


class SweepCheckCallback(Callback):
    """``on_multirun_start``: :func:`sweep_points` of the command line, :func:`point_errors`; ``SystemExit`` (status
    1, one line per bad point) before the sweeper hands any job to the launcher."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not self.enabled:
            return
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params else None
        points = sweep_points(list(config.hydra.overrides.task), params)
        if not points:
            return
        name = config.hydra.job.get("config_name") or "config"
        errors = point_errors(points, lambda overrides: check_point(overrides, name))
        if errors:
            lines = "\n".join(f"  {e}" for e in errors)
            raise SystemExit(
                f"vtw: {len(errors)} of {len(points)} sweep points are invalid; nothing ran (the checks of "
                f"hydra.callbacks.sweep_check):\n{lines}"
            )
