"""What every benchmark script shares: the machine's description and a sampled peak RSS.

Kept free of torch so that numpy-only benchmarks (bench_scaling.py) do not pay its import.
pipeline.core.resources.Peak reads the kernel's high-water mark instead; the sampler here also
works where /proc/self/clear_refs cannot be written, and the benchmarks' recorded peaks
were taken with it.
"""

from __future__ import annotations

import os
import platform
import threading


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where it is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(*extra: str) -> str:
    """'<cpu>, <n> cores visible, load <1-min load>' and any `extra` facts, comma-separated."""
    return ", ".join([cpu_name(), f"{os.cpu_count()} cores visible", f"load {os.getloadavg()[0]:.2f}", *extra])


class PeakRSS:
    """Largest resident set size of this process while the block runs (/proc/self/statm every 5 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
