"""Progress reporting that suits both a terminal and a batch log.

On a TTY it is a ``tqdm`` bar. Elsewhere (SLURM, CI, a pipe) bars garble log files, so it writes a plain log line at
most every ``every_s`` seconds and at every 10% step, plus a final line.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("vtw")


class Progress:
    """Count finished items of one phase.

    Args:
        total: number of items.
        desc: phase name shown in the bar or log lines.
        every_s: minimum seconds between two plain log lines (non-TTY only).
        enabled: False silences it entirely.
        tty: force bar (True) or log lines (False); default: whether stderr is a terminal.
    """

    def __init__(self, total: int, desc: str, *, every_s: float = 30.0, enabled: bool = True, tty: bool | None = None):
        self.total = int(total)
        self.desc = desc
        self.done = 0
        self.enabled = enabled
        self.every_s = every_s
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._start = time.perf_counter()
        self._last_log = self._start
        self._last_decile = 0
        self._bar = tqdm(total=self.total, desc=desc, dynamic_ncols=True) if enabled and self._tty else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled or self.total <= 0:
            return
        now = time.perf_counter()
        decile = (10 * self.done) // self.total
        if decile > self._last_decile or now - self._last_log >= self.every_s:
            self._last_decile = decile
            self._last_log = now
            self._log_line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.total > 0 and self._last_decile < 10:
            self._log_line(time.perf_counter())

    def _log_line(self, now: float) -> None:
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        log.info(
            "%s: %d/%d (%.0f%%) %.1fs elapsed, %.2f it/s, eta %.0fs",
            self.desc,
            self.done,
            self.total,
            100.0 * self.done / self.total,
            elapsed,
            rate,
            eta,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
