"""`wsss-domains pseudo-labels`: CAMs of a trained run turned into pseudo-label PNGs."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from wsss_domains.cam.extract import DEFAULT_SCALES
from wsss_domains.cli.common import (
    CliError,
    add_data_arguments,
    add_method_arguments,
    method_options,
    open_dataset,
    resolve_device,
    validate_dataset,
)
from wsss_domains.methods import create_method
from wsss_domains.pseudo_labels.writer import PseudoLabelOptions, PseudoLabelSummary, write_pseudo_labels
from wsss_domains.training.run import load_run


def add_pseudo_labels_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pseudo-labels",
        help="write pseudo-labels for a split with a trained run",
        description=(
            "Compute multi-scale + flip CAMs of every image with the run's classifier and write palette PNG "
            "pseudo-labels (plus overlays, optionally raw CAMs). Each image's image-level labels are used, as "
            "WSSS pseudo-labelling does; where a split carries none, the classifier's predictions are used "
            "and this is reported. Finished images are skipped, so a killed run resumes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="training run folder (train --out)")
    add_data_arguments(p)
    p.add_argument(
        "--labels-from-masks", action="store_true", help="derive each image's labels from its mask"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for the PNGs")
    add_method_arguments(p, default=None)
    p.add_argument("--scales", default=",".join(str(s) for s in DEFAULT_SCALES), help="CAM scales")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip averaging")
    p.add_argument("--bg-threshold", type=float, help="background threshold (threshold-background domains)")
    p.add_argument("--save-cams", action="store_true", help="also save raw CAMs (float16 .npz)")
    p.add_argument("--no-overlays", action="store_true", help="skip CAM overlay pictures")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_pseudo_labels)


def pseudo_label_split(
    run: Path,
    domain_name: str | None,
    dataset: str | None,
    data: Path,
    split: str | None,
    out: Path,
    labels_from_masks: bool = False,
    method_name: str | None = None,
    options: dict[str, object] | None = None,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    flip: bool = True,
    bg_threshold: float | None = None,
    save_cams: bool = False,
    overlays: bool = True,
    device: str = "cpu",
    progress: bool = True,
    dataset_options: Mapping[str, object] | None = None,
) -> PseudoLabelSummary:
    """``dataset_options`` go to the loader, e.g. ``labels_from_masks``/``patch_size`` to score tiles."""
    config, model, modules = load_run(run, device)
    opened = open_dataset(domain_name or config.domain, dataset, data, split, **(dataset_options or {}))
    label_space = opened.label_space
    if list(label_space.foreground_names) != config.foreground:
        raise CliError(
            f"the run was trained on classes {config.foreground}, but {opened.spec.name} has "
            f"{list(label_space.foreground_names)}"
        )
    # Bad files fail here, before the first pseudo-label is written.
    validate_dataset(opened.dataset, progress, label_space)
    name = method_name or config.method
    merged = {**(config.method_options if name == config.method else {}), **(options or {})}
    method = create_method(name, **merged)
    if name != config.method:
        modules = method.extra_modules(model.backbone.num_features, model.num_classes).to(device)
    extractor = method.extractor(model, modules, scales=scales, flip=flip, base_scale=config.base_scale)
    options = PseudoLabelOptions(
        label_source="masks" if labels_from_masks else "auto",
        bg_threshold=bg_threshold,
        save_cams=save_cams,
        overlays=overlays,
        device=device,
        progress=progress,
    )
    return write_pseudo_labels(
        opened.dataset, extractor, method, opened.domain, label_space, config.mean, config.std, out, options
    )


def run_pseudo_labels(args: argparse.Namespace) -> int:
    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError as exc:
        raise CliError(f"--scales must be comma-separated numbers, got '{args.scales}'") from exc
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
        scales=scales,
        flip=not args.no_flip,
        bg_threshold=args.bg_threshold,
        save_cams=args.save_cams,
        overlays=not args.no_overlays,
        device=resolve_device(args.device),
        progress=not args.no_progress,
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
