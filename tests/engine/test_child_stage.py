"""`run_stage`: a stage in a spawned child, its result, its exception, its death and its peak memory."""

from __future__ import annotations

import _thread
import multiprocessing
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from wsss_domains.child_stage import StageError, StageKilled, run_stage
from wsss_domains.peak_memory import PeakMemory
from wsss_domains.progress import progress_bars, progress_shown

MEASURABLE = Path("/proc/self/clear_refs").exists()


# Stages are module-level functions: the spawned child imports them by name.
def hold_memory(megabytes: int) -> tuple[int, bool]:
    block = np.ones(megabytes * 2**20, dtype=np.uint8)  # touched, so resident
    return os.getpid(), bool(block.all()) and progress_shown()


class Unpicklable(Exception):
    def __init__(self, code: int, detail: str) -> None:  # pickling passes one argument: unpicklable
        super().__init__(f"{code}: {detail}")


def sleep_ignoring_sigterm(seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a stage that handles SIGTERM itself
    time.sleep(seconds)


def fail(kind: str) -> None:
    if kind == "value":
        raise ValueError("no such split 'tset'")
    if kind == "unpicklable":
        raise Unpicklable(7, "odd")
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_stage_runs_in_a_child_with_its_result_peak_and_progress_switch():
    measured = PeakMemory()
    with progress_bars(False):
        pid, shown = run_stage(partial(hold_memory, 200), "cpu", measured)
    assert pid != os.getpid() and shown is False
    if MEASURABLE:
        assert 200 * 2**20 < measured.rss_bytes < 4 * 2**30  # the child's peak, not this process's
    in_process = PeakMemory()
    assert run_stage(partial(hold_memory, 50), "cpu", in_process, in_child=False)[0] == os.getpid()
    if MEASURABLE:
        assert in_process.rss_bytes > 50 * 2**20


def test_exceptions_come_back_as_themselves_or_as_a_stage_error():
    measured = PeakMemory()
    with pytest.raises(ValueError, match="no such split 'tset'") as raised:
        run_stage(partial(fail, "value"), "cpu", measured)
    assert "Raised in the stage's child process" in raised.value.__notes__[0]
    assert "fail" in raised.value.__notes__[0]  # the child's traceback names the failing function
    if MEASURABLE:
        assert measured.rss_bytes is not None  # measured though the stage raised
    with pytest.raises(StageError, match="Unpicklable: 7: odd"):
        run_stage(partial(fail, "unpicklable"), "cpu", PeakMemory())
    with pytest.raises(KeyboardInterrupt):
        run_stage(partial(fail, "interrupt"), "cpu", PeakMemory())


def test_a_killed_or_vanished_child_is_a_stage_killed_naming_the_signal():
    measured = PeakMemory()
    with pytest.raises(StageKilled, match="killed by SIGKILL.*out-of-memory killer") as killed:
        run_stage(partial(fail, "kill"), "cpu", measured)
    assert killed.value.signal_number == signal.SIGKILL and measured.rss_bytes is None
    with pytest.raises(StageKilled, match="exited with code 3") as exited:
        run_stage(partial(fail, "exit"), "cpu", PeakMemory())
    assert exited.value.signal_number is None
    assert not multiprocessing.active_children()  # no child left behind


def test_an_interrupt_of_the_parent_ends_the_child(monkeypatch):
    monkeypatch.setattr("wsss_domains.child_stage.TERMINATE_SECONDS", 1.0)
    # Python's own Ctrl-C handler, also where pytest started with SIGINT ignored (a background job
    # of a shell without job control): interrupt_main does nothing under an ignored SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(8.0, _thread.interrupt_main)  # Ctrl-C while the stage runs
    timer.start()
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stage(partial(sleep_ignoring_sigterm, 120.0), "cpu", PeakMemory())
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - start < 60 and not multiprocessing.active_children()
