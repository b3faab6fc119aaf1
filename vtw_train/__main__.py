"""``python -m vtw_train TASK [options]``: train a shipped checkpoint (``TASK --help`` lists a task's options)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

TASKS = ("synthvqa", "synthvideo")


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TASKS:
        print(f"usage: python -m vtw_train {{{','.join(TASKS)}}} [options]  (TASK --help for its options)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] == "synthvqa":
        from vtw_train.synthvqa import main as task_main
    else:
        from vtw_train.synthvideo import main as task_main
    return task_main(argv[1:])


if __name__ == "__main__":
    main()
