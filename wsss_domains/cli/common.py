"""Pieces every subcommand shares: opening a dataset, devices, errors, options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from wsss_domains.data.patches import PatchDataset, RandomPatchDataset
from wsss_domains.data.splits import SplitRequest, parse_split, sample_ids
from wsss_domains.domains import DatasetSpec, DomainPlugin, LabelSpace, get_domain


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


@dataclass
class OpenedData:
    domain: DomainPlugin
    spec: DatasetSpec
    split: str
    dataset: Dataset
    label_space: LabelSpace


def add_data_arguments(
    parser: argparse.ArgumentParser,
    data_required: bool = True,
    data_group: argparse._MutuallyExclusiveGroup | None = None,
) -> None:
    """--dataset, --data, --split; ``data_group`` holds --data when another input may replace it."""
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="loader name (see `wsss-domains domains`); recognised from --data if omitted",
    )
    (data_group or parser).add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        required=data_required and data_group is None,
        help="dataset folder",
    )
    parser.add_argument(
        "--split", metavar="S", help="split name as the dataset spells it (default: the loader's)"
    )


def add_tiles_argument(parser: argparse.ArgumentParser) -> None:
    """``--tiles N`` of pseudo-labels and evaluate: score tiles of a split instead of whole images."""
    parser.add_argument(
        "--tiles",
        type=int,
        metavar="N",
        help="cut each image into N x N tiles, each with its own image-level labels from its mask (the "
        "remote-sensing protocol `bench` uses); give the same N to pseudo-labels and evaluate",
    )


def tile_options(tiles: int | None) -> dict[str, object]:
    """Loader options for ``--tiles N`` (none without it)."""
    if tiles is None:
        return {}
    if tiles < 16:
        raise CliError(f"--tiles must be at least 16 pixels, got {tiles}")
    return {"labels_from_masks": True, "patch_size": tiles}


def open_dataset(
    domain_name: str,
    dataset_name: str | None,
    data: Path,
    split: str | None,
    **options: object,
) -> OpenedData:
    """Resolve domain, loader (by name or by recognising the folder) and split; build the dataset.

    ``random_patches=K`` with ``labels_from_masks`` draws K random windows per image instead of the
    loader's fixed grid (see :class:`RandomPatchDataset`); meant for training.
    """
    random_patches = options.pop("random_patches", None)
    if random_patches and options.get("labels_from_masks"):
        options.pop("labels_from_masks")
        patch_size = options.pop("patch_size", None)
        opened = open_dataset(domain_name, dataset_name, data, split, **options)
        opened.dataset = RandomPatchDataset(
            opened.dataset,
            opened.label_space,
            patch_size or opened.spec.patch_size,  # type: ignore[arg-type]
            per_image=int(random_patches),  # type: ignore[call-overload]
        )
        return opened
    domain = get_domain(domain_name)
    if not Path(data).exists():
        raise CliError(f"{data}: data folder does not exist")
    spec = domain.dataset(dataset_name) if dataset_name else domain.detect_dataset(Path(data))
    if split is None:
        split = spec.default_split or (spec.splits[0] if len(spec.splits) == 1 else None)
        if split is None:
            raise CliError(f"--split is required for {spec.name}: one of {', '.join(spec.splits)}")
    request = parse_split(split)
    if request.sliced and not spec.native_slices:
        dataset = _sliced_dataset(spec, Path(data), request, **options)
    else:
        dataset = spec.build(Path(data), split, **options)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise CliError(f"{data}: split '{split}' of {spec.name} holds no images")
    return OpenedData(domain, spec, split, dataset, spec.label_space_for(Path(data)))


def _sliced_dataset(spec: DatasetSpec, root: Path, request: SplitRequest, **options: object) -> Dataset:
    """A slice of a split's whole images (sorted by id); patches for --labels-from-masks are cut after."""
    labels_from_masks = bool(options.pop("labels_from_masks", False))
    patch_size = options.pop("patch_size", None)
    full = spec.build(root, request.base, labels_from_masks=False, **options)
    ids = sample_ids(full)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    subset = Subset(full, order[request.window(len(order))])
    if not labels_from_masks:
        return subset
    return PatchDataset(subset, spec.label_space_for(root), patch_size or spec.patch_size)  # type: ignore[arg-type]


def validate_dataset(dataset: Dataset, progress: bool = True, label_space: LabelSpace | None = None) -> None:
    """Read every sample once so bad files fail before anything is written.

    With ``label_space``, label vectors of the wrong length are refused here too: later they would
    only surface as a shape error deep inside batching or after earlier images were written.
    """
    names = label_space.foreground_names if label_space is not None else ()
    for i in tqdm(range(len(dataset)), desc="checking data", unit="img", disable=not progress, leave=False):  # type: ignore[arg-type]
        sample = dataset[i]
        label = sample.get("label")
        if label_space is not None and label is not None and label.numel() != len(names):
            raise CliError(
                f"sample {sample['id']}: label vector has {label.numel()} entries, "
                f"expected {len(names)} ({', '.join(names)})"
            )


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but torch sees no CUDA device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise CliError(f"unknown device '{name}' (cpu, cuda, cuda:N, auto)")
    return name


def add_method_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--method and the options methods take (stored in the run, overridable at pseudo-label time)."""
    parser.add_argument(
        "--method",
        default=default,
        help="WSSS method (see `wsss-domains methods`)" + ("" if default else "; default: the run's"),
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (values parsed as JSON when possible), e.g. num_iter=20",
    )
    parser.add_argument(
        "--sam-checkpoint", type=Path, help="SAM checkpoint for SAM-based methods (sepl, s2c, sam-proto)"
    )
    parser.add_argument("--clip-model", help="open_clip architecture for CLIP-based methods, e.g. ViT-B-16")
    parser.add_argument("--clip-weights", type=Path, help="local open_clip checkpoint for CLIP-based methods")


def method_options(args: argparse.Namespace) -> dict[str, object]:
    """Options from --method-option KEY=VALUE plus the dedicated SAM / CLIP flags."""
    import json

    options: dict[str, object] = {}
    for item in args.method_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--method-option expects KEY=VALUE, got '{item}'")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    for flag in ("sam_checkpoint", "clip_model", "clip_weights"):
        value = getattr(args, flag, None)
        if value is not None:
            options[flag] = str(value)
    return options
