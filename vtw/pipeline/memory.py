"""Peak memory of an evaluation: CUDA's max allocated bytes, or the process's peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024**3


class PeakMemory:
    """Measure the peak memory of a block of work on ``device``.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak at :meth:`start` (this work only).
    CPU: the process's peak resident set size so far (``ru_maxrss``; it cannot be reset, so it covers the whole
    process up to now, start-up included).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_max_rss"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GIB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / GIB * (1 if sys.platform == "darwin" else 1024)
