"""`wsss-domains train`: a classifier from image-level labels (and, on the demo, the whole pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import (
    add_data_arguments,
    add_domain_option_argument,
    add_method_arguments,
    domain_options,
    method_options,
)
from wsss_domains.cli.settings_arguments import SettingsArguments
from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier


def add_train_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help=command_help("train"),
        description=(
            "Train a multi-label classifier with a CAM head from image-level labels. Without --data, "
            "runs the whole pipeline (classifier, pseudo-labels, segmenter, label-free prediction, evaluation; "
            "see `wsss-domains run`) on the domain's small synthetic demo set. "
            "Re-running with the same --out resumes from its last checkpoint."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--domain", required=True, help="domain plugin name (see `wsss-domains domains`)")
    add_domain_option_argument(p)
    add_data_arguments(p, data_required=False)
    p.add_argument("--out", type=Path, help="run folder (default: runs/<domain>[-demo])")
    add_method_arguments(p, default=None, default_help="cam; the demo: the domain's recipe")
    CLASSIFIER_OPTIONS.add(
        p,
        helps={
            "image_size": "training input size in pixels (default 224; the demo's own size)",
            "max_minutes": "wall-clock training budget (demo default: 2)",
        },
    )
    p.set_defaults(func=run_train)


# The classifier's settings as `train` offers them; `run` offers a subset of the same fields.
CLASSIFIER_OPTIONS = SettingsArguments(
    ClassifierSettings,
    (
        "labels_from_masks", "patch_size", "random_patches", "backbone", "weights", "image_size",
        "output_stride", "pooling", "max_minutes", "max_epochs", "max_steps", "checkpoint_minutes",
        "batch_size", "accumulate_batches", "lr", "seed", "balance_classes", "device", "devices", "strategy", "num_workers",
    ),
)  # fmt: skip


def classifier_settings(args: argparse.Namespace) -> ClassifierSettings:
    """The classifier settings of the ``train`` options."""
    return ClassifierSettings(
        method=args.method or "cam", method_options=method_options(args), **CLASSIFIER_OPTIONS.values(args)
    )


def run_train(args: argparse.Namespace) -> int:
    if args.data is None:
        from wsss_domains.cli.demo import demo_folder, run_demo
        from wsss_domains.pipeline.run import RunSettings
        from wsss_domains.pipeline.segmenter import SegmenterSettings

        classifier = classifier_settings(args)
        # the segmenter's encoder is the classifier's backbone, so it starts from the same weights
        segmenter = SegmenterSettings(
            weights=args.weights,
            max_steps=args.max_steps,
            batch_size=min(8, args.batch_size),
            seed=args.seed,
            device=args.device,
        )
        settings = RunSettings(classifier, segmenter, method=args.method)
        args.out = args.out or demo_folder(args.domain)  # named, so config.yaml lands there
        run_demo(args.domain, args.out, settings, domain_options(args))
        return 0
    out = args.out = args.out or Path("runs") / args.domain
    trained = train_classifier(
        args.domain,
        args.data,
        out,
        split=args.split,
        dataset=args.dataset,
        settings=classifier_settings(args),
        domain_options=domain_options(args),
    )
    if trained.is_global_zero:
        print(f"model: {out / 'model.pt'}  (config {out / 'run.json'}, log {out / 'logs' / 'metrics.csv'})")
    return 0
