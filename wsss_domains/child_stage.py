"""One stage of a long job (a bench cell's training, its pseudo-labels) run in a child process.

In one process, the kernel's out-of-memory killer ends a whole matrix when one cell needs more
memory than the machine has: its SIGKILL cannot be caught, and no failed cell is written. Run in a
child, the stage's death is seen by the parent, which records it as that stage's failure and goes
on with the next cell.

The child is *spawned* (a fresh interpreter), not forked: a fork after PyTorch has run OpenMP
kernels hangs the child's first parallel kernel (GNU libgomp is not fork-safe), and CUDA cannot be
used in a forked child either. A spawned child imports the stage's function by name, so the function
and its arguments must be picklable, and whatever the stage needs registered (domains, methods) must
be registered on import (entry points are); the parent's progress-bar switch is carried over.
Starting one costs a few seconds of imports, which the
stage's time includes.

Peak memory is measured inside the child (:func:`~wsss_domains.peak_memory.peak_memory`); the
parent samples the child's resident size every second, so that a killed stage's message can say how
large it had grown.
"""

from __future__ import annotations

import multiprocessing
import pickle
import re
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from wsss_domains.peak_memory import PeakMemory, peak_memory
from wsss_domains.progress import progress_bars, progress_shown

T = TypeVar("T")
SAMPLE_SECONDS = 1.0
TERMINATE_SECONDS = 10.0
GB = 1e9


class StageKilled(RuntimeError):
    """The child running a stage ended without a result: killed by a signal, or exited early."""

    def __init__(self, message: str, signal_number: int | None = None, resident_bytes: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number
        self.resident_bytes = resident_bytes


class StageError(RuntimeError):
    """Stands for an exception of the child that could not be sent back as itself (not picklable)."""


def run_stage(fn: Callable[[], T], device: str, measured: PeakMemory, in_child: bool = True) -> T:
    """``fn()`` with its peak memory written into ``measured``, in a spawned child unless ``in_child`` is False.

    An exception of the stage is raised here as itself (with the child's traceback added as a
    note); a child that dies without a result raises :class:`StageKilled`. ``measured`` is filled
    whenever the stage ran to an end, also when it raised; it stays unknown (None) for a killed child.
    """
    if not in_child:
        try:
            with peak_memory(device) as peak:  # filled as the block ends
                return fn()
        finally:
            measured.rss_bytes, measured.gpu_bytes = peak.rss_bytes, peak.gpu_bytes
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_child_main, args=(sender, fn, device, progress_shown()), name="wsss-domains-stage"
    )
    start = time.perf_counter()
    child.start()
    sender.close()
    resident: int | None = None
    try:
        while not receiver.poll(SAMPLE_SECONDS):
            now = _resident_bytes(child.pid)
            if now is not None and (resident is None or now > resident):
                resident = now
        try:
            message = pickle.loads(receiver.recv_bytes())
        except EOFError:
            message = None
    except BaseException:  # an interrupt of the parent ends the child too
        child.terminate()
        child.join(TERMINATE_SECONDS)
        if child.is_alive():  # a stage that handles SIGTERM (Lightning may) is killed
            child.kill()
            child.join()
        raise
    finally:
        receiver.close()
    child.join()
    if message is None:
        raise StageKilled(
            _death(child.exitcode, time.perf_counter() - start, resident), _signal(child.exitcode), resident
        )
    outcome, payload, peak, child_traceback = message
    measured.rss_bytes, measured.gpu_bytes = peak.rss_bytes, peak.gpu_bytes
    if outcome == "raised":
        payload.add_note(f"Raised in the stage's child process:\n{child_traceback}")
        raise payload
    return payload


def _child_main(sender: Connection, fn: Callable[[], Any], device: str, progress: bool) -> None:
    peak = PeakMemory()
    try:
        try:
            with progress_bars(progress), peak_memory(device) as peak:
                result = fn()
            message = ("returned", result, peak, "")
        except BaseException as exc:  # KeyboardInterrupt included: the parent re-raises it
            message = ("raised", _sendable(exc), peak, traceback.format_exc())
        data = pickle.dumps(message)
    except Exception as exc:  # the result itself could not be pickled
        error = StageError(f"the stage's result could not be sent back: {type(exc).__name__}: {exc}")
        data = pickle.dumps(("raised", error, peak, traceback.format_exc()))
    sender.send_bytes(data)
    sender.close()


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (so the parent sees its type), else a :class:`StageError`."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return StageError(f"{type(exc).__name__}: {exc}")
    return exc


def _resident_bytes(pid: int | None) -> int | None:
    """The resident size of process ``pid`` (Linux ``/proc``), None where unknown."""
    try:
        found = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _signal(exitcode: int | None) -> int | None:
    return -exitcode if exitcode is not None and exitcode < 0 else None


def _death(exitcode: int | None, seconds: float, resident: int | None) -> str:
    number = _signal(exitcode)
    size = f", at about {resident / GB:.1f} GB resident" if resident else ""
    if number is None:
        return f"the stage's child process exited with code {exitcode} after {seconds:.0f} s without a result{size}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    text = f"the stage's child process was killed by {name} after {seconds:.0f} s{size}"
    if number == signal.SIGKILL:
        text += (
            "; most likely the kernel's out-of-memory killer (`dmesg` tells): this cell needs more "
            "memory than the machine has (a smaller batch or image size, or a larger machine)"
        )
    return text
