"""`wsss-domains evaluate`: score pseudo-labels or segmenter predictions against a split's masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import (
    add_data_arguments,
    add_domain_option_argument,
    add_tiles_argument,
    domain_options,
    tile_options,
)
from wsss_domains.pipeline.evaluate import evaluate_split, write_report


def add_evaluate_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help=command_help("evaluate"),
        description=(
            "Accumulate a confusion matrix over the split and report mIoU, per-class IoU, FwIoU, pixel "
            "accuracy, Dice and the domain's own metrics. Ignore / excluded pixels are not scored; mIoU "
            "averages the domain's scored classes that occur in the ground truth."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--domain", required=True)
    add_domain_option_argument(p, recorded=False)
    add_data_arguments(p)
    add_tiles_argument(p)
    p.add_argument("--pred", type=Path, required=True, help="folder of <id>.png predictions")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--plot", type=Path, help="write a per-class IoU bar chart (PNG) here")
    p.add_argument(
        "--html",
        type=Path,
        help="write a self-contained HTML page here: scores, per-class IoU, confusion matrix and the "
        "worst images (image, ground truth, prediction), the command and the environment",
    )
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    report = evaluate_split(
        args.domain,
        args.dataset,
        args.data,
        args.split,
        args.pred,
        dataset_options=tile_options(args.tiles),
        domain_options=domain_options(args),
        html=args.html,
    )
    write_report(report, args.json, args.plot)
    print(report.to_table())
    if args.html is not None:
        print(f"report: {args.html}")
    return 0
