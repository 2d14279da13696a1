"""`wsss-domains segment`: a segmentation network trained on a split's pseudo-labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import add_data_arguments, add_tiles_argument, tile_options
from wsss_domains.cli.settings_arguments import SettingsArguments
from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter

# The segmenter's network options, shared with `run` (where --batch-size and --lr are the classifier's).
SEGMENTER_NETWORK = SettingsArguments(
    SegmenterSettings,
    (
        "arch",
        "encoder",
        "weights",
        "crop_size",
        "scale",
        "scale_range",
        "class_weighting",
        "training",
        "carb_clip_model",
        "carb_clip_weights",
        "source_data",
        "source_domain",
        "source_dataset",
        "source_split",
        "source_classes",
        "rounds",
        "batch_size",
        "accumulate_batches",
        "lr",
    ),  # fmt: skip
    flags={
        "weights": "--encoder-weights",
        "scale": "--seg-scale",
        "training": "--seg-training",
        "rounds": "--seg-rounds",
        "batch_size": "--seg-batch-size",
        "accumulate_batches": "--seg-accumulate-batches",
        "lr": "--seg-lr",
    },
)
SEGMENTER_TRAINING = SettingsArguments(
    SegmenterSettings,
    (
        "max_minutes",
        "max_epochs",
        "max_steps",
        "seed",
        "balance_classes",
        "device",
        "devices",
        "strategy",
        "num_workers",
    ),
)


def add_segmenter_arguments(p: argparse.ArgumentParser) -> None:
    """The segmenter's network and training options (shared with ``run``)."""
    SEGMENTER_NETWORK.add(p.add_argument_group("segmenter"))


def segmenter_settings(args: argparse.Namespace, **training: object) -> SegmenterSettings:
    """The segmenter of the parsed options; ``training``: its budget, seed and devices."""
    return SegmenterSettings(**SEGMENTER_NETWORK.values(args), **training)  # type: ignore[arg-type]


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
        formatter_class=DefaultsHelpFormatter,
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
    SEGMENTER_TRAINING.add(p)
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
        settings=segmenter_settings(args, **SEGMENTER_TRAINING.values(args)),
        val_split=args.val_split,
    )
    print(
        f"segmenter: {args.out}  ({config.arch}, {config.encoder}; log {args.out / 'logs' / 'metrics.csv'})"
    )
    return 0
