"""`wsss-domains run`: the whole job for a domain in one command, with one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cam.settings import CAM_NORMALIZATIONS
from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import (
    CliError,
    add_domain_option_argument,
    add_method_arguments,
    domain_options,
    method_options,
)
from wsss_domains.cli.predict import add_inference_arguments, inference_options
from wsss_domains.cli.segment import add_segmenter_arguments, segmenter_settings
from wsss_domains.cli.settings_arguments import SettingsArguments
from wsss_domains.pipeline.classifier import ClassifierSettings
from wsss_domains.pipeline.run import RunReport, RunSettings, headline, run_pipeline
from wsss_domains.pipeline.segmenter import SegmenterSettings

DEFAULT_BUDGET = 15.0
# The classifier's options `run` offers; the budget is --budget-minutes.
RUN_CLASSIFIER = SettingsArguments(
    ClassifierSettings,
    (
        "labels_from_masks",
        "patch_size",
        "backbone",
        "weights",
        "image_size",
        "batch_size",
        "accumulate_batches",
    ),
)
# Options both networks share.
RUN_TRAINING = SettingsArguments(
    SegmenterSettings,
    ("max_steps", "seed", "balance_classes", "device", "devices", "strategy", "num_workers"),
)


def add_run_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help=command_help("run"),
        description=(
            "Train the classifier on --train-split, pseudo-label that split with its image-level labels and "
            "the domain's recommended method, train a segmenter on the pseudo-labels, segment --test-split "
            "without reading its labels, and score every stage where masks exist. Writes OUT/report.html "
            "(and .md, .json) with both figures WSSS papers report. Re-running with the same --out resumes. "
            "Without --data, runs on the domain's small synthetic demo set."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--domain", required=True, help="domain plugin name (see `wsss-domains domains`)")
    add_domain_option_argument(p)
    p.add_argument("--dataset", metavar="NAME", help="loader name; recognised from --data if omitted")
    p.add_argument(
        "--data", type=Path, metavar="DIR", help="dataset folder (none: the domain's synthetic demo set)"
    )
    p.add_argument(
        "--train-split",
        help="split to train on, e.g. train, 'validation[fold!=1/3]' or a union 'validation + training'",
    )
    p.add_argument("--test-split", help="split to segment without labels, e.g. val")
    p.add_argument("--out", type=Path, help="job folder (default for the demo: runs/<domain>-demo)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        help=f"training budget of each network (default {DEFAULT_BUDGET:g}; the demo: 2 and 1)",
    )
    p.add_argument(
        "--segmenter-minutes", type=float, help="the segmenter's budget (default: --budget-minutes)"
    )
    RUN_CLASSIFIER.add(
        p,
        helps={
            "labels_from_masks": "train on patches of fully annotated images, each labelled by the classes in its mask",
            "backbone": "the classifier's timm backbone",
            "weights": "the classifier's starting weights",
            "image_size": "the classifier's input size (default 224)",
            "batch_size": "the classifier's batch size",
            "accumulate_batches": "the classifier's gradient accumulation: N batches per optimiser step",
        },
    )
    add_method_arguments(p, default=None, default_help="the domain's recipe (see the report)")
    p.add_argument("--cam-norm", choices=CAM_NORMALIZATIONS, help="CAM normalisation (default: the recipe's)")
    add_segmenter_arguments(p)
    add_inference_arguments(p)
    RUN_TRAINING.add(
        p,
        helps={
            "max_steps": "optimiser step limit of each network (-1: none)",
            "balance_classes": "draw training images of rare classes more often in both networks (LVIS"
            " repeat-factor sampling at threshold T; 0: uniform, also where the domain's recipe balances"
            " the classifier; default: the recipe's)",
        },
        hidden=("devices", "strategy"),
    )
    p.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    demo = args.data is None
    if demo and (args.train_split or args.test_split or args.dataset):
        raise CliError("--dataset, --train-split and --test-split apply to --data (without it: the demo)")
    if not demo and not (args.train_split and args.test_split and args.out):
        raise CliError("with --data, give --train-split, --test-split and --out")
    budget = args.budget_minutes if args.budget_minutes is not None else (None if demo else DEFAULT_BUDGET)
    training = RUN_TRAINING.values(args)
    classifier = ClassifierSettings(**RUN_CLASSIFIER.values(args), max_minutes=budget, **training)
    segmenter_minutes = args.segmenter_minutes if args.segmenter_minutes is not None else budget
    settings = RunSettings(
        classifier=classifier,
        segmenter=segmenter_settings(args, max_minutes=segmenter_minutes, **training),
        method=args.method,
        method_options=method_options(args) or None,
        cam_norm=args.cam_norm,
        inference=inference_options(args),
    )
    if demo:
        from wsss_domains.cli.demo import demo_folder, run_demo

        args.out = args.out or demo_folder(args.domain)  # named, so config.yaml lands there
        run_demo(args.domain, args.out, settings, domain_options(args))
        return 0
    report = run_pipeline(
        args.domain,
        args.data,
        args.out,
        train_split=args.train_split,
        test_split=args.test_split,
        dataset=args.dataset,
        settings=settings,
        domain_options=domain_options(args),
    )
    print_summary(report, args.out)
    return 0


def print_summary(report: RunReport, out: Path) -> None:
    """The scored stages as a small table, and where the report is."""
    print()
    for name, miou in headline(report):
        print(f"{name:<45} mIoU {'n/a' if miou is None else f'{miou:.4f}'}")
    print(f"\nreport: {Path(out) / 'report.html'}  (also report.md, report.json)")
    print(
        f"segmenter: {Path(out) / 'segmenter'}  (wsss-domains predict --model {Path(out) / 'segmenter'} ...)"
    )
