"""What every benchmark script shares: the machine's description, a sampled peak RSS and a
matrix-product FLOP/s probe.

Kept free of a top-level torch import so that numpy-only benchmarks (bench_scaling.py) do not
pay it; :func:`matmul_tflops` imports torch when called.
pipeline.core.resources.Peak reads the kernel's high-water mark instead; the sampler here also
works where /proc/self/clear_refs cannot be written, and the benchmarks' recorded peaks
were taken with it.
"""

from __future__ import annotations

import os
import platform
import threading
import time


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


def matmul_tflops(seconds: float = 3.0, n: int = 2048, dtype: str = "float32", device: str = "cpu") -> float:
    """TFLOP/s of back-to-back (n, n) @ (n, n) products in `dtype` on `device`, over about `seconds`.

    The denominator of "fraction of peak": a dense matmul is the fastest work a device does in
    that dtype. One product runs untimed first (kernel choice, allocation); on CUDA the clock
    stops after a synchronize, so every queued product is counted as finished.
    """
    import torch

    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=dev).to(getattr(torch, dtype))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


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
