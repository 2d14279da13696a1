"""Pieces every subcommand shares: opening a dataset, devices, errors, options."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains import DatasetSpec, DomainPlugin, LabelSpace, get_domain

# "validation[0:20]": images 0..19 of the split (in the loader's sorted order), for hold-out scoring.
_SLICED_SPLIT = re.compile(r"^(?P<split>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)(?::(?P<step>-?\d+))?\]$")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


@dataclass
class OpenedData:
    domain: DomainPlugin
    spec: DatasetSpec
    split: str
    dataset: Dataset


def add_data_arguments(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="loader name (see `wsss-domains domains`); recognised from --data if omitted",
    )
    parser.add_argument("--data", metavar="DIR", type=Path, required=data_required, help="dataset folder")
    parser.add_argument(
        "--split", metavar="S", help="split name as the dataset spells it (default: the loader's)"
    )


def open_dataset(
    domain_name: str,
    dataset_name: str | None,
    data: Path,
    split: str | None,
    **options: object,
) -> OpenedData:
    """Resolve domain, loader (by name or by recognising the folder) and split; build the dataset."""
    domain = get_domain(domain_name)
    if not Path(data).exists():
        raise CliError(f"{data}: data folder does not exist")
    spec = domain.dataset(dataset_name) if dataset_name else domain.detect_dataset(Path(data))
    if split is None:
        split = spec.default_split or (spec.splits[0] if len(spec.splits) == 1 else None)
        if split is None:
            raise CliError(f"--split is required for {spec.name}: one of {', '.join(spec.splits)}")
    sliced = _SLICED_SPLIT.match(split)
    if sliced:
        dataset = _sliced_dataset(spec, Path(data), sliced, **options)
    else:
        dataset = spec.build(Path(data), split, **options)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise CliError(f"{data}: split '{split}' of {spec.name} holds no images")
    return OpenedData(domain, spec, split, dataset)


def _sliced_dataset(spec: DatasetSpec, root: Path, sliced: re.Match[str], **options: object) -> Dataset:
    """A slice of a split's whole images; patches for --labels-from-masks are cut after slicing."""
    labels_from_masks = bool(options.pop("labels_from_masks", False))
    patch_size = options.pop("patch_size", None)
    full = spec.build(root, sliced["split"], labels_from_masks=False, **options)

    def bound(text: str | None) -> int | None:
        return int(text) if text else None

    window = slice(bound(sliced["start"]), bound(sliced["stop"]), bound(sliced["step"]))
    subset = Subset(full, range(len(full))[window])  # type: ignore[arg-type]
    if not labels_from_masks:
        return subset
    return PatchDataset(subset, spec.label_space, int(patch_size or spec.patch_size))  # type: ignore[arg-type]


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
