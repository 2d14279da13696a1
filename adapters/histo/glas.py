"""Warwick GlaS (MICCAI 2015 gland segmentation): colon histology, gland versus background.

All files sit in one folder: ``train_<n>.bmp`` with ``train_<n>_anno.bmp``, likewise ``testA_<n>``
and ``testB_<n>`` (any common image suffix is accepted; annotations may be PNG). Annotations hold
gland instance ids (0 = background); they are binarised to background 0 / gland 1. Background
here is a real, scored class decided by a CAM threshold, not by colour: GlaS background is stroma
and mucosa, not glass.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.histo.dataset import IMAGE_SUFFIXES, Record, load_split, resolve_split
from wsss_adapters.loaders import loader_spec

from wsss_domains.data.io import DataError, read_index_mask, read_rgb
from wsss_domains.domains.contract import BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

NAME = "glas"
LABEL_SPACE = LabelSpace(
    classes=("background", "gland"),
    palette=((0, 0, 0), (255, 255, 255)),
    background_mode=BackgroundMode.THRESHOLD,
    background_index=0,
    ignore_color=(128, 128, 128),  # white already means gland
)
SPLITS = ("train", "testA", "testB")
ALIASES = {"training": "train"}
PATCH_SIZE = 256  # GlaS images are 775x522: 4x3 patches each, some without gland
DESCRIPTION = "Warwick GlaS: colon gland / background, background by CAM threshold"
_IMAGE = re.compile(r"^(train|testA|testB)_(\d+)$")


def _images(root: Path) -> dict[str, list[tuple[int, Path]]]:
    """Images per split prefix, by number; annotation files are not images."""
    found: dict[str, list[tuple[int, Path]]] = {s: [] for s in SPLITS}
    for path in root.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = _IMAGE.match(path.stem)
        if match:
            found[match.group(1)].append((int(match.group(2)), path))
    return found


def _annotation(image: Path) -> Path | None:
    for suffix in (image.suffix, ".png", ".bmp", ".tif"):
        path = image.with_name(f"{image.stem}_anno{suffix}")
        if path.is_file():
            return path
    return None


def detect(root: Path) -> bool:
    """A folder of ``train_<n>`` / ``testA_<n>`` / ``testB_<n>`` images with ``_anno`` files."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any(_annotation(path) is not None for paths in _images(root).values() for _, path in paths)


def _decode(rec: Record) -> tuple[Tensor, Tensor | None]:
    assert rec.mask is not None
    try:
        ids = read_index_mask(rec.mask)
    except DataError as exc:
        if not exc.problem.startswith("expected a palette or greyscale mask"):
            raise
        # Some GlaS copies store annotations as grey RGB: any non-black pixel is gland.
        ids = (read_rgb(rec.mask).amax(dim=0) > 0).long()
    return (ids > 0).long(), None


def build(root: Path, split: str, **options: object) -> Dataset:
    """Samples of one GlaS split (``train``, ``testA`` or ``testB``); ``options``: :class:`HistoOptions`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "GlaS folder not found")
    split = resolve_split(split, SPLITS, ALIASES, NAME)
    records = []
    for _, path in sorted(_images(root)[split]):
        anno = _annotation(path)
        if anno is None:
            raise DataError(path, f"no annotation for this image (looked for {path.stem}_anno.*)")
        records.append(Record(id=path.stem, image=path, mask=anno))
    return load_split(records, LABEL_SPACE, _decode, NAME, split, root, options, PATCH_SIZE)


SPEC = loader_spec(NAME, LABEL_SPACE, build, detect, SPLITS, DESCRIPTION, patch_size=PATCH_SIZE)
