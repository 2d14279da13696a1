"""What every remote-sensing loader shares: split resolution, file discovery, the final dataset.

A loader lists the :class:`Scene` records of a split; :func:`finish` applies the split's slice
(see :mod:`splits`), and the shared options, and returns the dataset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch.utils.data import Dataset
from wsss_adapters.remote_sensing.datasets import build_dataset
from wsss_adapters.remote_sensing.scene import ReadOptions, Scene

from wsss_domains.data.mask_codes import MaskCode
from wsss_domains.data.raster import Scaling
from wsss_domains.data.splits import SplitRequest, parse_split
from wsss_domains.domains.contract import LabelSpace

# Default tile side for --labels-from-masks: the common crop size of remote-sensing WSSS.
TILE = 256


def request_split(split: str | None, default: str, known: Sequence[str], dataset: str) -> SplitRequest:
    """The parsed split (default when None) whose base is one of ``known`` (case-insensitive)."""
    request = parse_split(split if split is not None else default)
    for name in known:
        if name.lower() == request.base.lower():
            return SplitRequest(name, request.start, request.stop)
    raise ValueError(
        f"dataset '{dataset}' has no split '{request.base}'; known: {', '.join(known)}"
        " (optionally sliced, e.g. 'train[0:6]' or 'train[80%:]')"
    )


def matching(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Files of ``folder`` whose name matches ``pattern``, sorted; none if the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name))


def any_matching(folders: Iterable[Path], pattern: re.Pattern[str]) -> bool:
    """Whether any of ``folders`` holds a file named like ``pattern`` (stops at the first)."""
    for folder in folders:
        if folder.is_dir() and any(pattern.match(p.name) for p in folder.iterdir()):
            return True
    return False


def finish(
    scenes: Sequence[Scene],
    request: SplitRequest,
    label_space: LabelSpace,
    code: MaskCode,
    *,
    where: Path,
    split: str | None,
    labels_from_masks: bool,
    patch_size: int | tuple[int, int] | None,
    bands: Sequence[int] | None,
    scaling: Scaling,
    overlap: int,
    min_fraction: float,
) -> Dataset:
    """Slice the split, then build whole-scene or tile samples as the options ask."""
    ids = [s.id for s in scenes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{where}: two images share the sample id '{dup}'")
    options = ReadOptions(code, None if bands is None else tuple(bands), scaling, min_fraction)
    return build_dataset(
        request.select(scenes),
        label_space,
        options,
        where=where,
        split=split if split is not None else request.base,
        labels_from_masks=labels_from_masks,
        patch_size=patch_size,
        default_patch_size=TILE,
        overlap=overlap,
    )
