"""`wsss-domains pseudo-labels`: CAMs of a trained run turned into pseudo-label PNGs, or one GeoTIFF.

Two inputs, one of them: a split of a dataset (``--data DIR --split S``: one palette PNG per image)
or one raster of any size (``--raster PATH``: one palette GeoTIFF written window by window, see
:mod:`wsss_domains.pseudo_labels.raster`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from wsss_domains.cam.settings import CamSettings
from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import (
    CliError,
    add_data_arguments,
    add_method_arguments,
    add_tiles_argument,
    method_options,
    resolve_device,
    tile_options,
)
from wsss_domains.cli.settings_arguments import SettingsArguments
from wsss_domains.data.large_images import LARGE_IMAGE_PIXELS
from wsss_domains.models.runtime import RUNTIMES
from wsss_domains.pipeline.pseudo_labels import (
    LABEL_FREE_SOURCES,
    pseudo_label_raster_file,
    pseudo_label_split,
)
from wsss_domains.pseudo_labels.raster import RasterOptions


def add_pseudo_labels_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pseudo-labels",
        help=command_help("pseudo-labels"),
        description=(
            "Compute multi-scale + flip CAMs of every image with the run's classifier and write palette PNG "
            "pseudo-labels (plus overlays, optionally raw CAMs). Each image's image-level labels are used, as "
            "WSSS pseudo-labelling does; where a split carries none, the classifier's predictions are used "
            "and this is reported; --label-free takes them from elsewhere on purpose. Finished images are skipped, so a killed run resumes. "
            "With --raster instead of --data, one raster of any size (GeoTIFF, anything rasterio reads) is "
            "pseudo-labelled window by window into a single-band palette GeoTIFF --out OUT.tif; its labels "
            "come from --labels, from --raster-mask, or else from the classifier (reported)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="training run folder (train --out)")
    inputs = p.add_mutually_exclusive_group(required=True)
    add_data_arguments(p, data_group=inputs)
    inputs.add_argument(
        "--raster",
        type=Path,
        metavar="PATH",
        help="one raster to pseudo-label window by window into --out OUT.tif (instead of --data)",
    )
    p.add_argument(
        "--labels-from-masks", action="store_true", help="derive each image's labels from its mask"
    )
    add_tiles_argument(p)
    p.add_argument(
        "--label-free",
        choices=LABEL_FREE_SOURCES,
        help="ignore the split's image-level labels and take them from: predicted (the classifier's "
        "logits), all (every class: the method's own pixel decisions choose, e.g. label-probe's probe), "
        "segmentation (the classes of each image's segmentation in --label-segmentation)",
    )
    p.add_argument(
        "--label-segmentation",
        type=Path,
        metavar="DIR",
        help="--label-free segmentation: a folder of label PNGs named by image id, e.g. predict --out",
    )
    p.add_argument(
        "--label-fraction",
        type=float,
        default=0.0,
        help="--label-free segmentation (or --raster with --raster-mask): the share of an image's (tile's,"
        " window's) scored pixels a class needs to be among its labels (0: one pixel)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder for the PNGs (with --raster: the .tif file)"
    )
    add_method_arguments(p, default=None)
    CAM_OPTIONS.add(p)
    p.add_argument("--save-cams", action="store_true", help="also save raw CAMs (float16 .npz)")
    p.add_argument("--no-overlays", action="store_true", help="skip CAM overlay pictures")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="where the CAM pass runs: auto (ONNX Runtime on the CPU, same maps, ~4x faster), torch, onnx",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=LARGE_IMAGE_PIXELS,
        metavar="N",
        help="images above N pixels (where the loader names their files, e.g. the folder loader) are "
        "labelled window by window in bounded memory, as --raster does; 0: every image whole",
    )
    add_raster_arguments(p)
    p.set_defaults(func=run_pseudo_labels)


CAM_OPTIONS = SettingsArguments(CamSettings, ("scales", "flip", "cam_norm", "bg_threshold"))

# Options of --raster only: absent from the namespace unless given, so that --data refuses them.
RASTER_OPTIONS = SettingsArguments(
    RasterOptions,
    ("window", "margin", "scaling", "max_over", "labels_per_window", "overview", "resume"),
    flags={"max_over": "--cam-max-over"},
)
RASTER_INPUTS = ("--raster-mask", "--labels", "--bands")  # what the raster holds, not how it is cut


def add_raster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raster input (--raster)")
    quiet = argparse.SUPPRESS
    g.add_argument(
        "--raster-mask",
        type=Path,
        metavar="PATH",
        default=quiet,
        help="mask raster of the same size (class ids, or the label space's colours): the raster's labels "
        "are the classes it holds",
    )
    g.add_argument(
        "--labels", metavar="NAME,NAME", default=quiet, help="the raster's image-level labels, by class name"
    )
    g.add_argument("--bands", metavar="1,2,3", default=quiet, help="1-based bands used as R,G,B (one: grey)")
    RASTER_OPTIONS.add(g, absent_unless_given=True)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise CliError(f"{flag} must be comma-separated integers, got '{text}'") from exc


def run_raster(args: argparse.Namespace, cam: CamSettings) -> int:
    """`pseudo-labels --raster PATH --out OUT.tif`: refuses the options of --data, prints what was used."""
    for flag, value in (
        ("--dataset", args.dataset),
        ("--split", args.split),
        ("--labels-from-masks", args.labels_from_masks),
        ("--save-cams", args.save_cams),
        ("--tiles", args.tiles),
        ("--label-free", args.label_free),
        ("--label-segmentation", args.label_segmentation),
    ):
        if value:
            raise CliError(f"{flag} applies to --data, not to --raster")
    if args.out.suffix.lower() not in (".tif", ".tiff"):
        raise CliError(f"with --raster, --out names the GeoTIFF to write (OUT.tif), got '{args.out}'")
    labels = getattr(args, "labels", None)
    mask = getattr(args, "raster_mask", None)
    if labels is not None and mask is not None:
        raise CliError(
            "give the raster's labels (--labels) or a mask to derive them from (--raster-mask), not both"
        )
    if not 0.0 <= args.label_fraction <= 1.0:
        raise CliError(f"--label-fraction must lie in [0, 1], got {args.label_fraction}")
    if args.label_fraction and mask is None:
        raise CliError("with --raster, --label-fraction applies to the labels read off --raster-mask")
    bands = getattr(args, "bands", None)
    options = RasterOptions(
        label_fraction=args.label_fraction,
        **asdict(cam),
        **RASTER_OPTIONS.values(args),
        bands=None if bands is None else _ints(bands, "--bands"),
        device=resolve_device(args.device),
    )
    summary = pseudo_label_raster_file(
        args.run,
        args.raster,
        args.out,
        mask=mask,
        labels=None if labels is None else labels.split(","),
        method_name=args.method,
        options=method_options(args),
        raster_options=options,
    )
    if summary.already_done:
        print(f"pseudo-label raster: already written from the same run, raster and options -> {args.out}")
    else:
        print(
            f"pseudo-label raster: {summary.height}x{summary.width} pixels, {summary.windows} windows of "
            f"{summary.window} (+{summary.margin} context), class maxima over the {summary.max_over}, "
            f"{summary.seconds:.1f} s -> {args.out}"
        )
        if summary.resumed_windows:
            print(f"resumed: {summary.resumed_windows} window(s) were already written")
    scope = "per window" if summary.labels_per_window else "for the raster"
    used = ", ".join(summary.labels) or "none"
    if summary.label_source == "predicted":
        print(
            "note: no image-level labels were given (--labels, --raster-mask); the classifier's predictions "
            f"{scope} were used: {used}"
        )
    else:
        source = "--labels" if summary.label_source == "given" else summary.mask
        print(f"labels ({scope}, from {source}): {used}")
    if summary.overview:
        print(f"overview: {summary.overview}")
    return 0


def check_label_free(args: argparse.Namespace) -> None:
    """--label-free and its two options: each needs the other, and labels are either ignored or read."""
    segmentation = args.label_free == "segmentation"
    if segmentation and args.label_segmentation is None:
        raise CliError(
            "--label-free segmentation needs --label-segmentation DIR (e.g. a predict --out folder)"
        )
    if not segmentation and args.label_segmentation is not None:
        raise CliError("--label-segmentation applies to --label-free segmentation")
    if not 0.0 <= args.label_fraction <= 1.0:
        raise CliError(f"--label-fraction must lie in [0, 1], got {args.label_fraction}")
    if args.label_fraction and not segmentation:
        raise CliError("--label-fraction applies to --label-free segmentation (with --data)")
    if args.label_free and args.labels_from_masks:
        raise CliError("--label-free ignores the images' labels; --labels-from-masks derives them: give one")


def run_pseudo_labels(args: argparse.Namespace) -> int:
    cam = CAM_OPTIONS.build(args)
    if args.raster is not None:
        return run_raster(args, cam)
    given = [flag for flag in RASTER_INPUTS if hasattr(args, flag[2:].replace("-", "_"))]
    for flag in given + RASTER_OPTIONS.given(args):
        raise CliError(f"{flag} applies to --raster, not to --data")
    if args.max_image_pixels < 0:
        raise CliError(f"--max-image-pixels must be >= 0 (0: every image whole), got {args.max_image_pixels}")
    check_label_free(args)
    summary = pseudo_label_split(
        args.run,
        None,
        args.dataset,
        args.data,
        args.split,
        args.out,
        labels_from_masks=args.labels_from_masks,
        method_name=args.method,
        options=method_options(args),
        cam=cam,
        save_cams=args.save_cams,
        overlays=not args.no_overlays,
        device=resolve_device(args.device),
        dataset_options=tile_options(args.tiles),
        runtime=args.runtime,
        max_image_pixels=args.max_image_pixels or None,
        label_free=args.label_free,
        label_segmentation=args.label_segmentation,
        label_fraction=args.label_fraction,
    )
    if summary.windowed:
        print(
            f"{len(summary.windowed)} image(s) above {args.max_image_pixels} pixels were labelled window by "
            "window"
        )
    if summary.predicted_label_images:
        print(
            f"note: {summary.predicted_label_images} image(s) carry no image-level labels in this split; "
            "the classifier's predicted labels were used for them"
        )
    print(f"pseudo-labels: {summary.written} written, {summary.skipped} already done -> {args.out}")
    if not args.no_overlays:
        print(f"overlays: {args.out / 'overlays'}")
    return 0
