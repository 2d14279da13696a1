"""Format checks on the real LoVeDA, Vaihingen and COCO samples, recorded with their commands.

For each development sample in ``../shared/data`` the whole pipeline runs through the CLI:
``wsss-domains train`` (remote sensing: 256 px tiles labelled from their masks; COCO: whole images
with the labels derived from their instances) for a few optimiser steps on the CPU, then
``pseudo-labels`` (each image's labels from its mask) and ``evaluate`` on the same split. The
figures go, with the exact commands and the machine, to ``benchmarks/results/format_checks.md``.

These samples hold 1, 2 and 64 images: there is no hold-out, the scored images are the training
images, and the classifier has seen a handful of steps. The rows check that the loaders, label
derivation, pseudo-labelling and metrics run end to end on the real formats; their mIoU is not a
quality figure.

    python benchmarks/format_checks.py                    # all three samples, 20 steps each
    python benchmarks/format_checks.py --samples coco --max-steps 5 --no-record

Each sample's folder under ``--out`` is deleted first (training resumes and pseudo-labelling skips
finished images, so a stale folder would be reused rather than recomputed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
RECORD = ROOT / "benchmarks" / "results" / "format_checks.md"
HEADER = """# Format checks: LoVeDA, Vaihingen and COCO development samples

Script: `benchmarks/format_checks.py` (issue #3). Each row runs the whole pipeline through the CLI on
one real development sample from `../shared/data`, in the dataset's own layout: `train` for a few
optimiser steps on the CPU (remote sensing: 256 px tiles labelled by the classes in their masks;
COCO: whole images with the labels derived from their instance annotations), then `pseudo-labels`
(each image's labels from its mask) and `evaluate`.

**These are format checks, not quality figures.** The samples hold 2 (LoVeDA), 1 (Vaihingen) and 64
(coco128) images; there is no hold-out in them, so the scored images are the very images the
classifier was trained on, after a handful of steps. The rows show that the loaders, the label
derivation, pseudo-labelling and the metrics (mIoU and the domain's own metrics) work end to end on
the real formats; the mIoU in them says nothing about how good the method is. Pseudo-labels are
written for whole images (the CLI's `pseudo-labels` / `evaluate` do not cut tiles), while training
uses tiles.
"""


@dataclass(frozen=True)
class Sample:
    name: str
    path: str  # relative to the data root
    domain: str
    dataset: str
    split: str
    patch_size: int | None  # train on mask-labelled tiles of this size; None: whole images
    note: str


SAMPLES = (
    Sample(
        "loveda",
        "remote_sensing/loveda-sample",
        "remote-sensing",
        "loveda",
        "val",
        256,
        "mmseg-converted LoveDA (`img_dir/ann_dir/val`), 2 images 1024x1024, 0 = no-data",
    ),
    Sample(
        "vaihingen",
        "remote_sensing/vaihingen-sample",
        "remote-sensing",
        "vaihingen",
        "val",
        256,
        "mmseg-converted ISPRS Vaihingen (`img_dir/ann_dir/val`), 1 image 512x512, 0 = boundary",
    ),
    Sample(
        "coco",
        "natural/coco128",
        "coco",
        "coco",
        "train2017",
        None,
        "COCO 2017 layout (`train2017/` + `annotations/instances_train2017.json`), 64 images",
    ),
)


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies beside it (commands run from there)."""
    path = Path(path).resolve()
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else str(path)


def run(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` from the repository root; its stdout is echoed and returned, stderr passes through."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout)
    return time.perf_counter() - start, proc.stdout


def shown(cmd: list[str]) -> str:
    """The command as recorded: ``python -m wsss_domains.cli ...`` instead of this interpreter's path."""
    return shlex.join(["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd)


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def steps_taken(log: Path) -> int | None:
    """Optimiser steps of a run, from its metrics log (one row per step)."""
    if not log.is_file():
        return None
    with log.open(newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("step", "").isdigit()]
    return max(steps) + 1 if steps else None


def check_sample(sample: Sample, data: Path, out: Path, max_steps: int) -> dict:
    exe = [sys.executable, "-m", "wsss_domains.cli"]
    if out.exists():
        shutil.rmtree(out)
    run_dir, pl_dir, metrics = out / "run", out / "pl", out / "metrics.json"
    common = ["--dataset", sample.dataset, "--data", rel(data), "--split", sample.split]
    tiles = ["--labels-from-masks", "--patch-size", str(sample.patch_size)] if sample.patch_size else []
    train_cmd = [
        *exe, "train", "--domain", sample.domain, *common, *tiles, "--out", rel(run_dir),
        # Each epoch is at least one step, so --max-steps is the limit that binds.
        "--max-steps", str(max_steps), "--max-epochs", str(max_steps), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    pl_cmd = [
        *exe, "pseudo-labels", "--run", rel(run_dir), *common, "--labels-from-masks", "--out", rel(pl_dir),
        "--no-overlays", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    eval_cmd = [
        *exe, "evaluate", "--domain", sample.domain, *common, "--pred", rel(pl_dir), "--json", rel(metrics),
        "--no-progress",
    ]  # fmt: skip
    row: dict = {"sample": sample, "commands": [train_cmd, pl_cmd, eval_cmd], "error": None}
    try:
        row["train_s"], stdout = run(train_cmd)
        found = re.search(r"(\d+) samples", stdout)
        row["train_samples"] = int(found[1]) if found else None
        row["steps"] = steps_taken(run_dir / "logs" / "metrics.csv")
        row["pl_s"], _ = run(pl_cmd)
        summary = json.loads((pl_dir / "pseudo-labels.json").read_text())
        row["label_source"] = summary.get("label_source")
        row["written"] = summary.get("written")
        row["eval_s"], _ = run(eval_cmd)
        report = json.loads(metrics.read_text())
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{sample.name}: FAILED ({row['error']})", flush=True)
        return row
    names = report["classes"]
    row["report"] = report
    row["present"] = [n for n, counts in zip(names, report["confusion"], strict=True) if sum(counts) > 0]
    row["n_classes"] = len(names)
    return row


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def section(rows: list[dict], skipped: list[str], args: argparse.Namespace) -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — `--max-steps {args.max_steps}`, CPU",
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only, "
        f"OMP_NUM_THREADS={threads}; Python {platform.python_version()}; revision {git_revision()}. "
        "Default training settings otherwise (tf_efficientnet_lite0 with the packaged ImageNet weights, "
        "224 px input, batch 32). Same split trained and scored: not a hold-out.",
        "\n| sample | split | trained on | steps | scored images | GT classes present | mIoU | "
        "pixel acc. | domain metrics | wall time (s): train / PL / eval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s: Sample = row["sample"]
        unit = f"tiles of {s.patch_size} px" if s.patch_size else "whole images"
        if row["error"]:
            lines.append(f"| {s.name} | `{s.split}` | | | | | **FAILED**: {row['error']} | | | |")
            continue
        report = row["report"]
        extra = ", ".join(f"{e['name']} {fmt(e['value'])}" for e in report.get("extra", [])) or "none"
        # Long lists (COCO's 80 categories) are left to the metrics JSON.
        present = ": " + ", ".join(row["present"]) if len(row["present"]) <= 12 else " (see its metrics JSON)"
        lines.append(
            f"| {s.name} | `{s.split}` | {row['train_samples']} {unit} | {row['steps']} | "
            f"{report['n_images']} | {len(row['present'])}/{row['n_classes']}{present} | "
            f"{fmt(report['miou'])} | {fmt(report['pixel_accuracy'])} | {extra} | "
            f"{row['train_s']:.0f} / {row['pl_s']:.0f} / {row['eval_s']:.0f} ({row['wall_s']:.0f} in all) |"
        )
    for message in skipped:
        lines.append(f"\nSkipped: {message}")
    lines.append("\nSamples:\n")
    for row in rows:
        lines.append(f"- {row['sample'].name}: {row['sample'].note}.")
    lines.append("\nCommands (from the repository root):\n\n```")
    for row in rows:
        lines += [shown(cmd) for cmd in row["commands"]]
    lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="the shared data folder")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "format-checks")
    p.add_argument("--max-steps", type=int, default=20, help="optimiser steps of each training run")
    p.add_argument(
        "--samples", default=",".join(s.name for s in SAMPLES), help="comma-separated samples to check"
    )
    p.add_argument("--no-record", action="store_true", help="print the section, do not append it")
    args = p.parse_args()

    by_name = {s.name: s for s in SAMPLES}
    wanted = [name.strip() for name in args.samples.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        p.error(f"unknown sample(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    rows, skipped = [], []
    for name in wanted:
        sample = by_name[name]
        data = args.data_root / sample.path
        if not data.is_dir():
            message = f"{name}: {data} is missing"
            print(f"skipping {message}", flush=True)
            skipped.append(message)
            continue
        print(f"\n== {name} ({sample.domain} / {sample.dataset}, split {sample.split})", flush=True)
        start = time.perf_counter()
        row = check_sample(sample, data, args.out / name, args.max_steps)
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
    if not rows:
        print("no sample folder found; nothing to record")
        return 0
    text = section(rows, skipped, args)
    print(text)
    if not args.no_record:
        if not RECORD.exists():
            RECORD.write_text(HEADER)
        with RECORD.open("a") as fh:
            fh.write(text)
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
