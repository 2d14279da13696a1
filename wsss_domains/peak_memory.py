"""Peak memory of one stage inside a long-lived process (a bench cell's training, its pseudo-labels).

``ru_maxrss`` only grows over a process's life, so a matrix that trains cell after cell in one
process would report the largest cell everywhere. On Linux the kernel's high-water mark of the
resident set (``VmHWM``) can be reset by writing ``5`` to ``/proc/self/clear_refs``; reset at the
start of a stage and read at its end, it is that stage's peak. On a CUDA device the allocator's
own peak is reset and read the same way. Where neither works the figure is ``None`` (unknown),
never a process-lifetime peak passed off as the stage's.

The reset lowers the mark only to the memory resident at the block's start, which includes heap an
earlier stage freed but the C allocator kept; so before resetting, garbage is collected and
glibc is asked to hand free heap back (``malloc_trim``). What stays resident (imported modules,
caches, fragments) still counts: a stage's figure is what the process held at its worst during it.

Data-loading worker processes (``--num-workers``) are other processes and are not counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
RESET_PEAK_RSS = "5"  # proc(5): "5" resets the peak resident set size (VmHWM) to the current RSS


@dataclass
class PeakMemory:
    """Peaks of the block, in bytes; ``None`` where this platform cannot measure them per block."""

    rss_bytes: int | None = None
    gpu_bytes: int | None = None


def _release_free_heap() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)
    except OSError:
        pass


def _reset_peak_rss() -> bool:
    _release_free_heap()
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def _peak_rss() -> int | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+)\s+kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _cuda(device: str) -> torch.device | None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.device(device)


@contextmanager
def peak_memory(device: str = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak resident memory (and GPU memory on ``cuda``) of the ``with`` block.

    The result object is filled when the block ends, also when it raises.
    """
    peak = PeakMemory()
    rss_measurable = _reset_peak_rss()
    gpu = _cuda(device)
    if gpu is not None:
        torch.cuda.reset_peak_memory_stats(gpu)
    try:
        yield peak
    finally:
        peak.rss_bytes = _peak_rss() if rss_measurable else None
        if gpu is not None:
            peak.gpu_bytes = int(torch.cuda.max_memory_allocated(gpu))


def larger(a: int | None, b: int | None) -> int | None:
    """The larger of two peaks, unknown if either is (a peak over both stages needs both)."""
    return None if a is None or b is None else max(a, b)
