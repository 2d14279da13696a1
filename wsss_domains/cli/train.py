"""`wsss-domains train`: a classifier from image-level labels (and, on the demo, the whole pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import command_help
from wsss_domains.cli.common import (
    add_data_arguments,
    add_domain_option_argument,
    add_method_arguments,
    domain_options,
    method_options,
    run_options,
)
from wsss_domains.models.classifier import DEFAULT_BACKBONE
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--domain", required=True, help="domain plugin name (see `wsss-domains domains`)")
    add_domain_option_argument(p)
    add_data_arguments(p, data_required=False)
    p.add_argument(
        "--labels-from-masks",
        action="store_true",
        help="cut fully annotated images into patches and label each patch by the classes in its mask",
    )
    p.add_argument(
        "--patch-size", type=int, help="patch size for --labels-from-masks (default: the loader's)"
    )
    p.add_argument(
        "--random-patches",
        type=int,
        metavar="K",
        help="with --labels-from-masks: draw K windows per image at random positions every epoch "
        "(each labelled from its own mask) instead of cutting a fixed grid",
    )
    p.add_argument("--out", type=Path, help="run folder (default: runs/<domain>[-demo])")
    add_method_arguments(p, default=None, default_help="cam; the demo: the domain's recipe")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm backbone name")
    p.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (packaged or locally cached pretrained weights), 'random', or a state-dict path",
    )
    p.add_argument(
        "--image-size", type=int, help="training input size in pixels (default 224; the demo's own size)"
    )
    p.add_argument(
        "--output-stride", type=int, default=16, choices=(8, 16, 32), help="backbone output stride"
    )
    p.add_argument("--pooling", default="gap", choices=("gap", "gmp", "lse"), help="CAM-to-logit pooling")
    p.add_argument("--max-minutes", type=float, help="wall-clock training budget (demo default: 2)")
    p.add_argument("--max-epochs", type=int, help="epoch limit (default: 10 without --max-minutes)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimiser step limit (-1: none)")
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        help="save checkpoints/last.ckpt at least this often (and every epoch); a killed run resumes from it",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (backbone: 0.1x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--devices", type=int, default=1, help="processes / GPUs (DDP when > 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def classifier_settings(args: argparse.Namespace) -> ClassifierSettings:
    """The classifier settings of the ``train`` options (shared with ``run``)."""
    return ClassifierSettings(
        method=args.method or "cam",
        method_options=method_options(args),
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        output_stride=args.output_stride,
        pooling=args.pooling,
        labels_from_masks=args.labels_from_masks,
        patch_size=args.patch_size,
        random_patches=args.random_patches,
        max_minutes=args.max_minutes,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        checkpoint_minutes=args.checkpoint_minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        **run_options(args),  # type: ignore[arg-type]
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
            progress=classifier.progress,
        )
        settings = RunSettings(classifier, segmenter, method=args.method, progress=classifier.progress)
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
