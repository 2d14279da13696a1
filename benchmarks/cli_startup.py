"""How fast the command line answers `--help`: wall time beyond Python's own start, and peak memory.

Compared with ``python -c "import torch"`` (the floor of any command that needs torch): the ratio
of the time `wsss-domains --help` adds to a bare interpreter over the time ``import torch`` adds.
Targets: <= 0.3 s beyond Python's start, ratio <= 0.2, peak RSS < 150 MB. Best of N runs each.
`wsss-domains domains` (every plugin built, its loaders listed) is recorded beside it; that it
imports no torch is a test (tests/engine/test_cli_startup.py).

    python benchmarks/cli_startup.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cli_startup.md"


def best(cmd: list[str], runs: int) -> float:
    """Best wall time (s) of ``runs`` runs of ``cmd``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb(argv: list[str]) -> float:
    """Peak memory of one command, in a fresh child (RUSAGE_CHILDREN keeps the largest child ever seen)."""
    probe = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['wsss-domains', *{argv!r}]\n"
        "try:\n    runpy.run_module('wsss_domains.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    py = sys.executable
    bare = best([py, "-c", "pass"], args.runs)
    torch_s = best([py, "-c", "import torch"], args.runs)
    helped = best([py, "-m", "wsss_domains.cli", "--help"], args.runs)
    # `domains` builds every plugin and lists its loaders, which import torch only when they read.
    listed = best([py, "-m", "wsss_domains.cli", "domains"], args.runs)
    rss_mb = peak_rss_mb(["--help"])
    listed_mb = peak_rss_mb(["domains"])
    extra, torch_extra = helped - bare, torch_s - bare
    ratio = extra / torch_extra
    print(f"python start {bare:.3f} s; import torch +{torch_extra:.3f} s; wsss-domains --help +{extra:.3f} s "
          f"(ratio {ratio:.3f}); --help peak RSS {rss_mb:.0f} MB")  # fmt: skip
    load = os.getloadavg()
    text = "\n".join([
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"\nBest of {args.runs} runs each; {platform.machine()}, {os.cpu_count()} cores; load average (1 min) "
        f"{load[0]:.2f}.",
        "\n| measure | value | target |",
        "|---|---|---|",
        f"| `python -c pass` | {bare:.3f} s | |",
        f"| `python -c 'import torch'`, beyond Python's start | {torch_extra:.3f} s | |",
        f"| `wsss-domains --help`, beyond Python's start | **{extra:.3f} s** | <= 0.3 s |",
        f"| ratio of the two | **{ratio:.3f}** | <= 0.2 |",
        f"| `wsss-domains --help` peak RSS | **{rss_mb:.0f} MB** | < 150 MB |",
        f"| `wsss-domains domains`, beyond Python's start | **{listed - bare:.3f} s** | no torch (test) |",
        f"| `wsss-domains domains` peak RSS | **{listed_mb:.0f} MB** | < 150 MB |",
        "\nCommand:\n", "```", shlex.join(["python", *sys.argv]), "```",
    ]) + "\n"  # fmt: skip
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# Command-line start-up: `wsss-domains --help`\n")
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
