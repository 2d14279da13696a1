"""`wsss-domains segment`: a segmentation network trained on a split's pseudo-labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import command_help
from wsss_domains.cli.common import add_data_arguments, add_tiles_argument, run_options, tile_options
from wsss_domains.pipeline.segmenter import DEFAULT_CROP, SegmenterSettings, fit_segmenter
from wsss_domains.segmentation.model import ARCHITECTURES


def add_segmenter_arguments(p: argparse.ArgumentParser) -> None:
    """The segmenter's network and training options (shared with ``run``)."""
    g = p.add_argument_group("segmenter")
    g.add_argument("--arch", choices=tuple(ARCHITECTURES), help="architecture (default: deeplabv3plus)")
    g.add_argument("--encoder", help="timm encoder (default: the classifier run's backbone)")
    g.add_argument(
        "--encoder-weights",
        default="imagenet",
        help="'imagenet' (packaged weights, as the classifier's), 'random', or a state-dict path",
    )
    g.add_argument(
        "--crop-size",
        type=int,
        help=f"training crop side (default: the run's patch size, else {DEFAULT_CROP})",
    )
    g.add_argument("--seg-batch-size", type=int, default=8, help="crops per training batch")
    g.add_argument("--seg-lr", type=float, default=1e-3, help="decoder learning rate (encoder: 0.1x)")


def segmenter_settings(args: argparse.Namespace, minutes: float | None) -> SegmenterSettings:
    return SegmenterSettings(
        arch=args.arch,
        encoder=args.encoder,
        weights=args.encoder_weights,
        crop_size=args.crop_size,
        max_minutes=minutes,
        max_epochs=getattr(args, "max_epochs", None),
        max_steps=getattr(args, "max_steps", -1),
        batch_size=args.seg_batch_size,
        lr=args.seg_lr,
        **run_options(args),  # type: ignore[arg-type]
    )


def add_segment_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help=command_help("segment"),
        description=(
            "Train a segmentation network (segmentation-models-pytorch, timm encoder started from the "
            "packaged ImageNet weights) on the pseudo-labels of a split, as WSSS papers do after "
            "pseudo-labelling. Only the pseudo-labels are learnt from: the split's masks are never read. "
            "Pixels a pseudo-label leaves unassigned carry no loss. Re-running with the same --out resumes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="the classifier run the pseudo-labels came from")
    p.add_argument("--pseudo-labels", type=Path, required=True, help="pseudo-label folder of the split")
    add_data_arguments(p)
    add_tiles_argument(p)
    p.add_argument("--out", type=Path, required=True, help="segmenter folder")
    p.add_argument(
        "--val-split",
        metavar="S",
        help="an annotated split of --data scored each epoch (val/miou in the log), for monitoring only",
    )
    add_segmenter_arguments(p)
    p.add_argument("--max-minutes", type=float, help="wall-clock training budget")
    p.add_argument("--max-epochs", type=int, help="epoch limit (default: 10 without --max-minutes)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimiser step limit (-1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (mixed precision on cuda)")
    p.add_argument("--devices", type=int, default=1, help="processes / GPUs (DDP when > 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    config = fit_segmenter(
        args.run,
        args.pseudo_labels,
        args.data,
        args.out,
        split=args.split,
        dataset=args.dataset,
        dataset_options=tile_options(args.tiles),
        settings=segmenter_settings(args, args.max_minutes),
        val_split=args.val_split,
    )
    print(
        f"segmenter: {args.out}  ({config.arch}, {config.encoder}; log {args.out / 'logs' / 'metrics.csv'})"
    )
    return 0
