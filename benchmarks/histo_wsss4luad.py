"""Histology pseudo-label quality benchmark on WSSS4LUAD (labels from masks), recorded with its command.

Trains on a split with ``--labels-from-masks`` inside a CPU time budget, pseudo-labels the scoring
split with each image's image-level labels, evaluates mIoU over the three tissue classes, once per
method, and appends the figures with the exact commands to ``benchmarks/results/histo.md``.

The issue's protocol (WSSS pseudo-label quality: train on a split's patches labelled from their
masks, pseudo-label and score that same split's ROIs; run it on a held-out copy of the source by
pointing --data at it):
    python benchmarks/histo_wsss4luad.py --data /path/to/WSSS4LUAD
Generalisation to ROIs the classifier and the probes never saw (a hold-out inside the data):
    python benchmarks/histo_wsss4luad.py --train-split "validation[0:20]" --eval-split "validation[20:]"
Train on one copy, score another:
    python benchmarks/histo_wsss4luad.py --eval-data /path/to/other/WSSS4LUAD --eval-split test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "histo" / "WSSS4LUAD"


def cli_main(cmd: list[str]) -> float:
    """Run one `wsss-domains` command line in this process (the record shows it as typed)."""
    from wsss_domains.cli import main as cli

    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    if cli(cmd[1:]) != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WSSS4LUAD folder to train on")
    p.add_argument("--train-split", default="validation")
    p.add_argument("--eval-data", type=Path, help="WSSS4LUAD folder to score (default: --data)")
    p.add_argument("--eval-split", default="validation")
    p.add_argument(
        "--methods",
        default="cam,seed-probe,label-probe,cam-proto+label-probe",
        help="comma-separated methods to pseudo-label with",
    )
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-histo")
    p.add_argument("--train-extra", default="", help="extra arguments for `train`")
    p.add_argument(
        "--pl-extra", default="", help="extra arguments for `pseudo-labels`, e.g. '--cam-norm sigmoid'"
    )
    p.add_argument(
        "--reuse-run",
        action="store_true",
        help="skip training when OUT/run already holds a trained model (re-score an earlier run with new "
        "pseudo-labelling; the record says so)",
    )
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    exe = ["wsss-domains"]
    eval_data = args.eval_data or args.data
    run_dir = args.out / "run"
    train_cmd = [
        *exe, "train", "--domain", "histo", "--dataset", "wsss4luad", "--data", str(args.data),
        "--split", args.train_split, "--labels-from-masks", "--patch-size", str(args.patch_size),
        "--image-size", str(args.image_size), "--out", str(run_dir), "--max-minutes", str(args.max_minutes),
        "--no-progress", *shlex.split(args.train_extra),
    ]  # fmt: skip
    reused = args.reuse_run and (run_dir / "model.pt").is_file()
    train_s = 0.0 if reused else cli_main(train_cmd)
    rows = []
    for method in args.methods.split(","):
        pl = args.out / f"pl-{method}"
        shutil.rmtree(pl, ignore_errors=True)  # pseudo-labels resume; a benchmark starts afresh
        pl_cmd = [
            *exe, "pseudo-labels", "--run", str(run_dir), "--dataset", "wsss4luad", "--data", str(eval_data),
            "--split", args.eval_split, "--labels-from-masks", "--method", method, "--out", str(pl), "--no-progress",
            *shlex.split(args.pl_extra),
        ]  # fmt: skip
        pl_s = cli_main(pl_cmd)
        metrics = args.out / f"metrics-{method}.json"
        eval_cmd = [
            *exe, "evaluate", "--domain", "histo", "--dataset", "wsss4luad", "--data", str(eval_data),
            "--split", args.eval_split, "--pred", str(pl), "--json", str(metrics), "--no-progress",
        ]  # fmt: skip
        cli_main(eval_cmd)
        report = json.loads(metrics.read_text())
        rows.append((method, report, pl_s, pl_cmd, eval_cmd))

    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — train `{args.train_split}`, score `{args.eval_split}`",
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        + (
            "training: the run of an earlier section, reused (`--reuse-run`)."
            if reused
            else f"training {train_s / 60:.1f} min wall."
        ),
        "\n| method | mIoU | tumor | stroma | normal | pseudo-label time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, report, pl_s, _, _ in rows:
        pc = report["per_class_iou"]

        def cell(name: str, pc: dict = pc) -> str:
            value = pc.get(name)
            return "n/a (absent)" if value is None else f"{value:.4f}"

        lines.append(
            f"| {method} | {report['miou']:.4f} | {cell('tumor')} | {cell('stroma')} | {cell('normal')} | {pl_s:.0f} |"
        )
    lines.append("\nCommands:\n\n```")
    lines.append(shlex.join(train_cmd))
    for _, _, _, pl_cmd, eval_cmd in rows:
        lines += [shlex.join(pl_cmd), shlex.join(eval_cmd)]
    lines.append("```")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        results = ROOT / "benchmarks" / "results" / "histo.md"
        if not results.exists():
            results.write_text("# Histology benchmark: WSSS4LUAD, labels from masks\n")
        with results.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
