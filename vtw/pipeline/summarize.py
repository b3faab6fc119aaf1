"""``python -m vtw.pipeline.summarize SWEEP_DIR``: summarise any directory of vtw job directories.

Writes ``summary.csv``, ``summary.md`` and ``pareto.png`` into SWEEP_DIR and prints the table. Exit status 0 when
every job finished, 1 when any failed or is unfinished, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from .summary import summarize_sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtw.pipeline.summarize", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="directory holding job directories (job.json / results.json)")
    p.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = p.parse_args(argv)
    try:
        s = summarize_sweep(args.sweep_dir, write=not args.no_write, plot=not (args.no_plot or args.no_write))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if s.jobs and s.ok == s.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
