"""`wsss-domains run`: the whole job for a domain in one command, with one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import command_help
from wsss_domains.cli.common import (
    CliError,
    add_domain_option_argument,
    add_method_arguments,
    domain_options,
    method_options,
)
from wsss_domains.cli.predict import add_inference_arguments, inference_options
from wsss_domains.cli.segment import add_segmenter_arguments, segmenter_settings
from wsss_domains.models.classifier import DEFAULT_BACKBONE
from wsss_domains.pipeline.classifier import ClassifierSettings
from wsss_domains.pipeline.run import RunReport, RunSettings, headline, run_pipeline

DEFAULT_BUDGET = 15.0


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--domain", required=True, help="domain plugin name (see `wsss-domains domains`)")
    add_domain_option_argument(p)
    p.add_argument("--dataset", metavar="NAME", help="loader name; recognised from --data if omitted")
    p.add_argument(
        "--data", type=Path, metavar="DIR", help="dataset folder (none: the domain's synthetic demo set)"
    )
    p.add_argument("--train-split", help="split to train on, e.g. train or 'validation[fold!=1/3]'")
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
    p.add_argument(
        "--labels-from-masks",
        action="store_true",
        help="train on patches of fully annotated images, each labelled by the classes in its mask",
    )
    p.add_argument(
        "--patch-size", type=int, help="patch size for --labels-from-masks (default: the loader's)"
    )
    add_method_arguments(p, default=None, default_help="the domain's recipe (see the report)")
    p.add_argument("--cam-norm", choices=("max", "sigmoid"), help="CAM normalisation (default: the recipe's)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="the classifier's timm backbone")
    p.add_argument("--weights", default="imagenet", help="the classifier's starting weights")
    p.add_argument("--image-size", type=int, help="the classifier's input size (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="the classifier's batch size")
    add_segmenter_arguments(p)
    add_inference_arguments(p)
    p.add_argument(
        "--max-steps", type=int, default=-1, help="optimiser step limit of each network (-1: none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (mixed precision on cuda)")
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    demo = args.data is None
    if demo and (args.train_split or args.test_split or args.dataset):
        raise CliError("--dataset, --train-split and --test-split apply to --data (without it: the demo)")
    if not demo and not (args.train_split and args.test_split and args.out):
        raise CliError("with --data, give --train-split, --test-split and --out")
    budget = args.budget_minutes if args.budget_minutes is not None else (None if demo else DEFAULT_BUDGET)
    classifier = ClassifierSettings(
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        labels_from_masks=args.labels_from_masks,
        patch_size=args.patch_size,
        max_minutes=budget,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    segmenter_minutes = args.segmenter_minutes if args.segmenter_minutes is not None else budget
    settings = RunSettings(
        classifier=classifier,
        segmenter=segmenter_settings(args, segmenter_minutes),
        method=args.method,
        method_options=method_options(args) or None,
        cam_norm=args.cam_norm,
        inference=inference_options(args),
        progress=not args.no_progress,
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
