"""What a process holds in memory, and the peak of a piece of work: the measurements
behind ``gradients.memory_gb``.

On CPU the bound is the process's resident set (what the operating system kills for):
``resident_bytes`` reads ``VmRSS`` after handing glibc's freed-but-kept pages back
(``malloc_trim``), so it counts what is in use; ``Peak`` resets the kernel's high-water
mark (``/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM``, which sees every
page touched, however short-lived. Where either is missing (another OS or libc), a
thread samples the resident set every few milliseconds instead. On CUDA the bound is the
device memory torch allocates (``memory_allocated`` / ``max_memory_allocated``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import resource
import sys
import threading
from typing import Iterator, Optional

import torch

_STATUS = "/proc/self/status"


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(key: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def trim() -> None:
    """Return freed heap pages to the OS (glibc only; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def resident_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes in use now: the trimmed resident set on CPU, torch's allocated memory on CUDA."""
    if _is_cuda(device):
        return int(torch.cuda.memory_allocated(device))
    trim()
    kib = _status_kib("VmRSS")
    if kib is None:  # no /proc: the lifetime peak is all getrusage gives (KiB on Linux, bytes on macOS)
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return peak if sys.platform == "darwin" else peak * 1024
    return kib * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class Peak:
    """``with Peak(device) as p: ...`` then ``p.bytes``: the most memory in use inside the block."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.bytes = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def __enter__(self) -> "Peak":
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_hwm():
            self.bytes = resident_bytes(self.device)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            kib = _status_kib("VmRSS")
            if kib is not None:
                self.bytes = max(self.bytes, kib * 1024)

    def __exit__(self, *exc) -> None:
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.bytes = (_status_kib("VmHWM") or 0) * 1024


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (0: unchanged), then restore the old
    setting, so an in-process run does not change the caller's torch configuration."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(before)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
