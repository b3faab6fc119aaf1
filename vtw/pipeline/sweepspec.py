"""Sweep specs: Hydra ``-m`` override syntax expanded into the points of a sweep.

A sweep spec is what follows ``python run.py -m`` on a command line, e.g. ``vtw.layer=null,8,12 model=tiny-llava``.
It is given as arguments or as a spec file: the file's lines are joined into one command line (so a spec file
describes one sweep, the product over all its sweeping overrides), ``#`` starts a comment, whitespace separates
overrides and quotes group (``prompt='a b'``), as in a shell.

Parsing and expansion are Hydra's own: ``OverridesParser`` parses every override and ``BasicSweeper.split_arguments``
forms the product, so choice lists ``a,b``, ``choice(...)``, ``range(start,stop[,step])``, ``shuffle(...)`` and
``glob(...)`` (with ``config_dir``) give exactly the jobs ``python run.py -m`` would run, in the same order. The
sweeper's ``hydra.sweeper.params`` from the primary config are not read: put every sweep in the spec.

The plan of a SLURM sweep (``slurm/submit_sweep.sh``) is a JSON file ``sweep.json`` in the sweep directory:
``{"version": 1, "spec": [...], "points": [{"index": i, "dirname": ..., "overrides": [...], "run": [...]}, ...],
"search": [[...], ...]}``. Array task ``i`` runs ``python run.py <run> hydra.run.dir=<sweep_dir>/<dirname>`` for
point ``i``. The directory name is ``<index>_<overrides of the keys that vary across the sweep>``, made
filesystem-safe and fixed in the plan, so a requeued or resubmitted task writes to (and resumes in) the same
directory and no two tasks share one. ``run`` is the point's overrides plus :data:`RUN_DEFAULTS` (and the sweep's
W&B group) for the keys the point does not set. ``search`` lists the overrides of one ``mode=search`` job per
distinct point with ``vtw.layer=auto``.

Command line (``python -m vtw.pipeline.sweepspec``)::

    expand [--spec FILE] [--config-dir DIR] [--out PLAN] OVERRIDE...   # print the points, or write the plan
    prepare SWEEP_DIR [--spec FILE] [--config-dir DIR] OVERRIDE...     # write the plan of a new sweep (none for an
        # existing one), then print points=N, searches=N and pending=<--array list of the points without results>
    status SWEEP_DIR [--pending] [--out TSV]  # every point's status; --pending: the indices to run, e.g. "1,4-6"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .results import RESULTS_FILE
from .status import JOB_FILE

PLAN_FILE = "sweep.json"
PLAN_VERSION = 1
# Overrides the SLURM flow sets itself for every point; a spec must not set them.
RESERVED_KEYS = ("hydra.run.dir",)
LAYER_KEY = "vtw.layer"
AUTO_LAYER = "auto"
# A point's job dir holds job.json {"status": "running" | "ok" | "failed" | "skipped" (resumed: the results of an
# identical finished job were copied in), ...} and, when finished, results.json (vtw.pipeline.status / results).
POINT_STATUSES = ("ok", "failed", "running", "missing")
# Overrides every job of a SLURM sweep gets unless its point sets the key itself: with resume=true a requeued or
# resubmitted task skips the work already done for its exact config; compare_baseline=false makes a point compute
# what the same point of a local sweep (`python run.py -m`) computes (its own K only; put vtw.layer=null in the sweep
# for the baseline).
RUN_DEFAULTS = ("resume=true", "compare_baseline=false")
SEARCH_MODE = "mode=search"

_MAX_DIRNAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+~@-]+")


@dataclass(frozen=True)
class SweepPoint:
    """One job of a sweep: its array index, its overrides (from the spec), its job directory's name, and the
    overrides its job runs with (``overrides`` plus :data:`RUN_DEFAULTS`; ``hydra.run.dir`` comes on top)."""

    index: int
    overrides: tuple[str, ...]
    dirname: str
    run: tuple[str, ...]


@dataclass(frozen=True)
class SweepPlan:
    """A sweep expanded from its spec: the points in Hydra's order and the layer searches they need (each the
    overrides of one ``mode=search`` job)."""

    spec: tuple[str, ...]
    points: tuple[SweepPoint, ...]
    search: tuple[tuple[str, ...], ...]


def tokenize_spec(text: str) -> list[str]:
    """Split a spec file's text into overrides: whitespace separates, quotes group (kept), ``#`` starts a comment.

    A backslash keeps the next character in the current override (as Hydra's escapes do). An unterminated quote is
    a ValueError naming the line.
    """
    tokens: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        current: list[str] = []
        quote: str | None = None
        i = 0
        while i < len(line):
            ch = line[i]
            if ch == "\\" and i + 1 < len(line):
                current.append(line[i : i + 2])
                i += 2
                continue
            if quote is not None:
                current.append(ch)
                if ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
                current.append(ch)
            elif ch == "#" and not current:
                break
            elif ch.isspace():
                if current:
                    tokens.append("".join(current))
                    current = []
            else:
                current.append(ch)
            i += 1
        if quote is not None:
            raise ValueError(f"sweep spec line {lineno}: unterminated {quote} quote in {line.strip()!r}")
        if current:
            tokens.append("".join(current))
    return tokens


def read_spec_file(path: str | os.PathLike[str]) -> list[str]:
    """The overrides of a spec file (see :func:`tokenize_spec`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep spec file {str(path)!r} does not exist")
    return tokenize_spec(path.read_text())


def _config_loader(config_dir: str | os.PathLike[str] | None):
    if config_dir is None:
        return None
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    config_dir = Path(config_dir).resolve()
    if not config_dir.is_dir():
        raise ValueError(f"config dir {str(config_dir)!r} does not exist")
    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir)))


def expand_overrides(overrides: Sequence[str], *, config_dir: str | os.PathLike[str] | None = None) -> list[list[str]]:
    """Expand sweep overrides into one override list per job, exactly as ``python run.py -m OVERRIDES`` would.

    ``config_dir`` (the Hydra config directory) is needed only for ``glob(...)`` sweeps over config groups.
    Anything Hydra's parser rejects, a sweep Hydra's basic sweeper cannot enumerate (``interval(...)``), a reserved
    key (``hydra.run.dir``) or a command-line flag (``-m``) is a ValueError naming it.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [str(o) for o in overrides]
    for o in overrides:
        if o.startswith("-") and not o.startswith("~"):
            raise ValueError(
                f"sweep spec: {o!r} is a command-line flag, not an override; give only key=value overrides"
            )
    parser = OverridesParser.create(config_loader=_config_loader(config_dir))
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as e:
        raise ValueError(f"sweep spec: Hydra cannot parse the overrides {overrides}: {e}") from None
    for p in parsed:
        key = p.key_or_group
        if key in RESERVED_KEYS:
            raise ValueError(f"sweep spec: {p.input_line!r} sets {key}, which the sweep sets for every point itself")
        if p.value_type is not None and p.is_sweep_override() and not p.is_discrete_sweep():
            raise ValueError(
                f"sweep spec: {p.input_line!r} is a {p.value_type.name} sweep; only enumerable sweeps are allowed "
                "(a,b,c / choice(...) / range(...) / glob(...))"
            )
        if p.is_sweep_override() and p.value_type.name == "GLOB_CHOICE_SWEEP" and config_dir is None:
            raise ValueError(f"sweep spec: {p.input_line!r} is a glob sweep; it needs the config dir (--config-dir)")
    try:
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as e:
        raise ValueError(f"sweep spec: cannot expand {overrides}: {e}") from None
    if not batch or batch == [[]]:
        return [[]]
    return [list(job) for job in batch]


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def _bare_key(override: str) -> str:
    return _key(override).lstrip("+~")


def run_overrides(overrides: Sequence[str], defaults: Sequence[str] = RUN_DEFAULTS) -> tuple[str, ...]:
    """``overrides`` plus each of ``defaults`` whose key they do not set (``+key``/``++key``/``~key`` count)."""
    keys = {_bare_key(o) for o in overrides}
    return (*overrides, *(d for d in defaults if _bare_key(d) not in keys))


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def point_dirname(index: int, overrides: Sequence[str], varying: Sequence[str]) -> str:
    """``<index>_<k=v,...>`` for the overrides whose key is in ``varying``, filesystem-safe, at most 120 chars.

    Characters outside ``[A-Za-z0-9._=,+~@-]`` become ``_``; a name that had to be shortened ends in a hash of the
    full overrides so that it stays unique.
    """
    parts = [o for o in overrides if _key(o) in set(varying)]
    body = _UNSAFE.sub("_", ",".join(parts)).strip("_")
    name = f"{index}_{body}" if body else str(index)
    if len(name) > _MAX_DIRNAME:
        digest = hashlib.sha1("\0".join(overrides).encode()).hexdigest()[:10]
        name = f"{name[: _MAX_DIRNAME - 11]}-{digest}"
    return name


def _varying_keys(jobs: Sequence[Sequence[str]]) -> list[str]:
    keys: list[str] = []
    for o in jobs[0] if jobs else []:
        k = _key(o)
        if len({tuple(_value(x) for x in job if _key(x) == k) for job in jobs}) > 1:
            keys.append(k)
    return keys


def layer_searches(points: Sequence[SweepPoint], defaults: Sequence[str] = RUN_DEFAULTS) -> list[tuple[str, ...]]:
    """One ``mode=search`` job (its overrides) per distinct point with ``vtw.layer=auto``, in sweep order.

    The search jobs pre-compute the cached layer that the array tasks then read. Points that differ only in keys the
    search does not depend on still get a job each; the search cache (keyed by model, tasks, samples and eta, under
    a file lock) makes all but the first of them a cache hit.
    """
    seen: dict[tuple[str, ...], None] = {}
    for p in points:
        if any(_key(o) == LAYER_KEY and _value(o) == AUTO_LAYER for o in p.overrides):
            search = (*(o for o in p.overrides if _bare_key(o) != "mode"), SEARCH_MODE)
            seen.setdefault(run_overrides(search, defaults), None)
    return list(seen)


def wandb_group(sweep_dir: str | os.PathLike[str]) -> str:
    """The W&B group of a sweep's jobs: ``<parent>-<name>`` of the sweep directory, as for a local sweep."""
    d = Path(sweep_dir).resolve()
    return _UNSAFE.sub("_", f"{d.parent.name}-{d.name}").replace(",", "_").strip("_")


def plan_sweep(
    spec: Sequence[str], *, config_dir: str | os.PathLike[str] | None = None, group: str | None = None
) -> SweepPlan:
    """Expand ``spec`` (a list of overrides) into a :class:`SweepPlan` (points numbered 0.. in Hydra's order).

    ``group``: the W&B group every job logs into (``++logger.group``, unless the spec sets ``logger.group``), so that
    the jobs of one sweep, which run as separate single runs, are grouped as in a local sweep.
    """
    jobs = expand_overrides(spec, config_dir=config_dir)
    varying = _varying_keys(jobs)
    defaults = (*RUN_DEFAULTS, f"++logger.group='{group}'") if group else RUN_DEFAULTS
    points = tuple(
        SweepPoint(i, tuple(job), point_dirname(i, job, varying), run_overrides(job, defaults))
        for i, job in enumerate(jobs)
    )
    return SweepPlan(spec=tuple(spec), points=points, search=tuple(layer_searches(points, defaults)))


def write_plan(path: str | os.PathLike[str], plan: SweepPlan) -> None:
    """Write the plan as JSON, atomically."""
    data = {
        "version": PLAN_VERSION,
        "spec": list(plan.spec),
        "points": [
            {"index": p.index, "dirname": p.dirname, "overrides": list(p.overrides), "run": list(p.run)}
            for p in plan.points
        ],
        "search": [list(s) for s in plan.search],
    }
    atomic_write_json(path, data, indent=1)


def read_plan(sweep_dir_or_file: str | os.PathLike[str]) -> SweepPlan:
    """Read ``sweep.json`` (give the sweep directory or the file)."""
    path = Path(sweep_dir_or_file)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: not a sweep submitted with slurm/submit_sweep.sh")
    try:
        data = json.loads(path.read_text())
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"{str(path)!r} has plan version {data.get('version')!r}; this vtw reads {PLAN_VERSION}")
        points = tuple(
            SweepPoint(int(p["index"]), tuple(p["overrides"]), str(p["dirname"]), tuple(p["run"]))
            for p in data["points"]
        )
        return SweepPlan(spec=tuple(data["spec"]), points=points, search=tuple(tuple(s) for s in data["search"]))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{str(path)!r} is not a valid sweep plan: {type(e).__name__}: {e}") from None


def point_status(sweep_dir: str | os.PathLike[str], point: SweepPoint) -> str:
    """``ok`` (results there, computed or resumed), ``failed``, ``running`` (started, not finished: running or
    killed) or ``missing`` (never started)."""
    job_dir = Path(sweep_dir) / point.dirname
    job_file = job_dir / JOB_FILE
    if not job_file.is_file():
        return "missing"
    try:
        status = json.loads(job_file.read_text()).get("status")
    except (json.JSONDecodeError, OSError):
        return "running"
    if status in ("ok", "skipped") and (job_dir / RESULTS_FILE).is_file():
        return "ok"
    if status == "failed":
        return "failed"
    return "running"


def pending_indices(sweep_dir: str | os.PathLike[str], plan: SweepPlan | None = None) -> list[int]:
    """Indices of the points that have no results yet (everything but ``ok``)."""
    plan = plan if plan is not None else read_plan(sweep_dir)
    return [p.index for p in plan.points if point_status(sweep_dir, p) != "ok"]


def format_indices(indices: Sequence[int]) -> str:
    """Indices as a SLURM ``--array`` list with runs collapsed: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def status_table(sweep_dir: str | os.PathLike[str], plan: SweepPlan | None = None) -> str:
    """Tab-separated ``index  status  dirname`` lines (with a header) for every point of a submitted sweep."""
    plan = plan if plan is not None else read_plan(sweep_dir)
    rows = ["index\tstatus\tdirname"] + [f"{p.index}\t{point_status(sweep_dir, p)}\t{p.dirname}" for p in plan.points]
    return "".join(r + "\n" for r in rows)


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vtw.pipeline.sweepspec", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("expand", help="expand a sweep spec into its points")
    ex.add_argument("--spec", help="spec file (Hydra -m override syntax, # comments)")
    ex.add_argument("--config-dir", help="Hydra config dir (needed for glob(...) sweeps)")
    ex.add_argument("--out", help="write the plan (sweep.json) here instead of printing the points")
    ex.add_argument("overrides", nargs="*")
    pr = sub.add_parser("prepare", help="plan a new sweep in SWEEP_DIR (or read an existing one) and say what to run")
    pr.add_argument("sweep_dir")
    pr.add_argument("--spec", help="spec file (Hydra -m override syntax, # comments)")
    pr.add_argument("--config-dir", help="Hydra config dir (needed for glob(...) sweeps)")
    pr.add_argument("overrides", nargs="*")
    st = sub.add_parser("status", help="status of every point of a submitted sweep")
    st.add_argument("sweep_dir")
    st.add_argument("--pending", action="store_true", help="print only the indices not yet ok, as an --array list")
    st.add_argument("--out", help="also write the status table (TSV) here")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "expand":
            spec = (read_spec_file(args.spec) if args.spec else []) + list(args.overrides)
            plan = plan_sweep(spec, config_dir=args.config_dir)
            if args.out:
                write_plan(args.out, plan)
                print(f"{len(plan.points)} points, {len(plan.search)} layer searches -> {args.out}")
            else:
                for p in plan.points:
                    print(f"{p.index}\t{p.dirname}\t{' '.join(p.overrides)}")
        elif args.cmd == "prepare":
            plan_file = Path(args.sweep_dir) / PLAN_FILE
            if plan_file.exists():
                if args.spec or args.overrides:
                    raise ValueError(
                        f"{args.sweep_dir!r} already holds a sweep ({PLAN_FILE}); resubmit it without a spec or "
                        "overrides, or pick a new sweep dir"
                    )
                plan = read_plan(plan_file)
            else:
                spec = (read_spec_file(args.spec) if args.spec else []) + list(args.overrides)
                plan = plan_sweep(spec, config_dir=args.config_dir, group=wandb_group(args.sweep_dir))
                write_plan(plan_file, plan)
            print(f"points={len(plan.points)}")
            print(f"searches={len(plan.search)}")
            print(f"pending={format_indices(pending_indices(args.sweep_dir, plan))}")
        else:
            plan = read_plan(args.sweep_dir)
            if args.pending:
                print(format_indices(pending_indices(args.sweep_dir, plan)))
            else:
                table = status_table(args.sweep_dir, plan)
                if args.out:
                    atomic_write_text(args.out, table)
                print(table, end="")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
