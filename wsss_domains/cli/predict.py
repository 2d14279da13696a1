"""`wsss-domains predict`: label-free segmentation of a split, a folder, a raster or slides."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import CliError, add_data_arguments, resolve_device
from wsss_domains.cli.settings_arguments import SettingsArguments
from wsss_domains.segmentation.inference import InferenceOptions
from wsss_domains.segmentation.raster import DEFAULT_MARGIN, DEFAULT_WINDOW, WindowedOptions

# How the network runs over an image, shared with `run`.
INFERENCE_OPTIONS = SettingsArguments(
    InferenceOptions,
    ("window", "overlap", "flip", "tta_rotations", "tta_scales", "runtime"),
    flags={"window": "--network-window"},
)


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """How the network runs over an image (shared with ``run``)."""
    INFERENCE_OPTIONS.add(p.add_argument_group("inference"))


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    return InferenceOptions(**INFERENCE_OPTIONS.values(args), device=resolve_device(args.device))


def add_predict_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help=command_help("predict"),
        description=(
            "Segment images that carry no labels with a segmenter (`segment --out`). Input: a dataset split "
            "(--data DIR --split S: only pixels are read; `evaluate` scores the PNGs like pseudo-labels), a "
            "folder of image files (--images), one raster of any size (--raster: a georeferenced palette "
            "GeoTIFF --out OUT.tif, window by window), or whole-slide images (--slide: a slide or a folder "
            "of them; a pyramidal label TIFF and a thumbnail overlay per slide, tissue only). Finished "
            "outputs are skipped and killed runs resume."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="segmenter folder (segment --out)")
    inputs = p.add_mutually_exclusive_group(required=True)
    add_data_arguments(p, data_group=inputs)
    inputs.add_argument("--images", type=Path, metavar="DIR", help="a folder of image files")
    inputs.add_argument(
        "--raster", type=Path, metavar="PATH", help="one raster (GeoTIFF, ...) -> --out OUT.tif"
    )
    inputs.add_argument("--slide", type=Path, metavar="PATH", help="a whole-slide image or a folder of them")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (with --raster: the GeoTIFF to write)"
    )
    add_inference_arguments(p)
    g = p.add_argument_group("rasters and slides")
    g.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="side of the windows written")
    g.add_argument(
        "--margin", type=int, default=DEFAULT_MARGIN, help="context pixels read around each window"
    )
    g.add_argument("--bands", metavar="1,2,3", help="raster bands used as R,G,B (1-based)")
    g.add_argument(
        "--overview", type=Path, metavar="PNG", help="raster: also write a downsampled palette PNG"
    )
    s = g.add_mutually_exclusive_group()
    s.add_argument("--level", type=int, help="slide pyramid level to segment (default 0, full resolution)")
    s.add_argument("--mpp", type=float, help="slide resolution to segment at, in microns per pixel")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (mixed precision on cuda)")
    p.add_argument("--devices", type=int, default=1, help="processes / GPUs to shard images or slides across")
    p.add_argument("--strategy", default="auto", help="Lightning strategy when --devices > 1, e.g. ddp")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.set_defaults(func=run_predict)


def _windowed(args: argparse.Namespace) -> WindowedOptions:
    return WindowedOptions(window=args.window, margin=args.margin, overview=args.overview)


def run_predict(args: argparse.Namespace) -> int:
    from wsss_domains.pipeline import predict as api

    options = inference_options(args)
    if args.data is None and (args.dataset or args.split):
        raise CliError("--dataset and --split apply to --data")
    if args.raster is None and (args.bands or args.overview):
        raise CliError("--bands and --overview apply to --raster")
    if args.slide is None and (args.level is not None or args.mpp is not None):
        raise CliError("--level and --mpp apply to --slide")
    if args.raster is not None:
        if args.out.suffix.lower() not in (".tif", ".tiff"):
            raise CliError(f"with --raster, --out names the GeoTIFF to write (OUT.tif), got '{args.out}'")
        bands = None
        if args.bands:
            try:
                bands = tuple(int(b) for b in args.bands.split(","))
            except ValueError as exc:
                raise CliError(f"--bands must be comma-separated integers, got '{args.bands}'") from exc
        summary = api.predict_raster(
            args.model, args.raster, args.out, bands=bands, options=options, windowed=_windowed(args)
        )
        state = "already written" if summary.already_done else f"{summary.seconds:.1f} s"
        print(
            f"prediction raster: {summary.height}x{summary.width} pixels, {summary.windows} windows ({state}) "
            f"-> {args.out}"
        )
        return 0
    sharding = api.Sharding(devices=args.devices, strategy=args.strategy, num_workers=args.num_workers)
    if args.slide is not None:
        summaries = api.predict_slides(
            args.model,
            args.slide,
            args.out,
            level=args.level,
            mpp=args.mpp,
            options=options,
            windowed=_windowed(args),
            sharding=sharding,
        )
        for s in summaries:
            state = "already written" if s.already_done else f"{s.seconds:.1f} s"
            print(
                f"slide {Path(s.source).name}: {s.height}x{s.width} pixels, {s.windows - s.skipped_windows} of "
                f"{s.windows} windows hold tissue ({state}) -> {s.out} (thumbnail {s.overview})"
            )
        return 0
    common = dict(options=options, sharding=sharding)
    if args.images is not None:
        summary = api.predict_folder(args.model, args.images, args.out, **common)
    else:
        summary = api.predict_split(
            args.model,
            args.data,
            args.out,
            split=args.split,
            dataset=args.dataset,
            **common,
        )
    print(f"predictions: {summary.written} written, {summary.skipped} already done -> {args.out}")
    return 0
