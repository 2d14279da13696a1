"""`wsss-domains train`: a classifier from image-level labels (and, on the demo, the whole pipeline)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from wsss_domains.cli.common import (
    add_data_arguments,
    add_method_arguments,
    method_options,
    open_dataset,
    resolve_device,
    validate_dataset,
)
from wsss_domains.data.patches import pair
from wsss_domains.domains import get_domain
from wsss_domains.models.classifier import DEFAULT_BACKBONE
from wsss_domains.training.fit import TrainOptions, train
from wsss_domains.training.run import RunConfig

DEMO_MINUTES = 2.0


def add_train_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a CAM classifier from image-level labels",
        description=(
            "Train a multi-label classifier with a CAM head from image-level labels. Without --data, "
            "runs the whole pipeline (train, pseudo-label, evaluate) on the domain's small synthetic demo set. "
            "Re-running with the same --out resumes from its last checkpoint."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--domain", required=True, help="domain plugin name (see `wsss-domains domains`)")
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
    add_method_arguments(p, default="cam")
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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (backbone: 0.1x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--devices", type=int, default=1, help="processes / GPUs (DDP when > 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    demo = args.data is None
    domain = get_domain(args.domain)
    out = args.out or Path("runs") / (f"{args.domain}-demo" if demo else args.domain)
    max_minutes = args.max_minutes
    if demo:
        from wsss_domains.cli.demo import prepare_demo

        demo_data = prepare_demo(domain, out)
        args.data, args.dataset, args.split = demo_data.root, demo_data.dataset, demo_data.train_split
        args.labels_from_masks = args.labels_from_masks or demo_data.labels_from_masks
        max_minutes = DEMO_MINUTES if max_minutes is None else max_minutes
        args.image_size = args.image_size or demo_data.image_size
    args.image_size = args.image_size or 224
    device = resolve_device(args.device)
    opened = open_dataset(
        args.domain,
        args.dataset,
        args.data,
        args.split,
        labels_from_masks=args.labels_from_masks,
        patch_size=args.patch_size,
        random_patches=args.random_patches if args.labels_from_masks else None,
    )
    progress = not args.no_progress
    label_space = opened.label_space
    if os.environ.get("LOCAL_RANK", "0") == "0":
        validate_dataset(opened.dataset, progress, label_space)
    mean, std = domain.normalization()
    patch = pair(args.patch_size or opened.spec.patch_size) if args.labels_from_masks else None
    # Patches keep their aspect ratio and are magnified to --image-size on their long side; CAMs later
    # run at that same magnification (base_scale). Whole images are resized to a square.
    scale = args.image_size / max(patch) if patch else 1.0
    input_size = (
        (round(patch[0] * scale), round(patch[1] * scale)) if patch else (args.image_size, args.image_size)
    )
    config = RunConfig(
        domain=args.domain,
        dataset=opened.spec.name,
        classes=list(label_space.classes),
        foreground=list(label_space.foreground_names),
        backbone=args.backbone,
        weights=args.weights,
        output_stride=args.output_stride,
        pooling=args.pooling,
        image_size=list(input_size),
        base_scale=scale,
        mean=mean,
        std=std,
        method=args.method,
        method_options=method_options(args),
        split=opened.split,
        data=str(Path(args.data).resolve()),
        labels_from_masks=args.labels_from_masks,
        patch_size=list(patch) if patch else None,
        random_patches=args.random_patches if args.labels_from_masks else None,
        seed=args.seed,
        demo=demo,
    )
    options = TrainOptions(
        max_minutes=max_minutes,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        num_workers=args.num_workers,
        device=device,
        devices=args.devices,
        strategy=args.strategy,
        progress=progress,
    )
    print(
        f"training {args.backbone} ({args.method}) on {opened.spec.name}/{opened.split}: {len(opened.dataset)} samples -> {out}"
    )  # type: ignore[arg-type]
    trainer = train(config, domain, opened.dataset, out, options)
    if not trainer.is_global_zero:
        return 0
    print(f"model: {out / 'model.pt'}  (config {out / 'run.json'}, log {out / 'logs' / 'metrics.csv'})")
    if demo:
        from wsss_domains.cli.demo import finish_demo

        finish_demo(domain, demo_data, out, device, progress)
    return 0
