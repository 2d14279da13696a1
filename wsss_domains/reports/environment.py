"""The command and machine a report records, so a figure can be traced to how it was made."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import wsss_domains


def command_line(argv: Sequence[str] | None = None) -> str:
    """The process's command line as given (``sys.argv``), quoted so it can be pasted into a shell."""
    return shlex.join(sys.argv if argv is None else argv)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` where there is one, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (as ``nproc`` counts them), which can be fewer than the host's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def environment() -> dict[str, str]:
    """Versions and hardware, as display strings: wsss-domains, Python, torch, platform, CPUs, CUDA."""
    import torch

    info = {
        "wsss-domains": wsss_domains.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "CPUs": f"{usable_cpus()} usable of {os.cpu_count()} ({cpu_model()})",
        "torch threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["CUDA"] = f"{torch.version.cuda}: " + ", ".join(names)
    else:
        info["CUDA"] = "none"
    return info
