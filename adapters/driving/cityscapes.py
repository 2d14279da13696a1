"""Cityscapes (``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/...``) as 19 train ids.

Masks come from ``*_gtFine_labelTrainIds.png`` when the folder has them (written by
cityscapesScripts' ``createTrainIdLabelImgs``) and are otherwise derived from the always-present
``*_gtFine_labelIds.png`` through the official table (labels.py); ``label_source`` forces one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.driving.dataset import MaskDecoder, Record, build_street
from wsss_adapters.driving.labels import CITYSCAPES, label_ids_to_train_ids
from wsss_adapters.loaders import loader_spec

from wsss_domains.data.io import DataError, read_index_mask
from wsss_domains.domains.contract import IGNORE_INDEX

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

NAME = "cityscapes"
SPLITS = ("train", "val", "test")
DEFAULT_CROP = (256, 512)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SOURCES = ("auto", "labelIds", "labelTrainIds")
DESCRIPTION = "Cityscapes fine annotations, 19 train ids (labelIds mapped by the official table)"


def decode_label_ids(path: Path) -> Tensor:
    """A ``*_gtFine_labelIds.png`` mapped to train ids (unevaluated ids -> ignore)."""
    ids = read_index_mask(path)
    if int(ids.max()) > 33:
        raise DataError(path, f"holds label id {int(ids.max())}; Cityscapes labelIds lie in 0..33")
    return label_ids_to_train_ids(ids)


def decode_train_ids(path: Path) -> Tensor:
    """A ``*_gtFine_labelTrainIds.png`` as stored; anything but 0..18 and 255 is an error."""
    ids = read_index_mask(path)
    bad = (ids.numpy() >= CITYSCAPES.num_classes) & (ids.numpy() != IGNORE_INDEX)
    if bad.any():
        raise DataError(path, f"holds train id {int(ids.numpy()[bad][0])}; expected 0..18 or {IGNORE_INDEX}")
    return ids


def _annotation(gt_dir: Path, stem: str, label_source: str) -> tuple[Path, MaskDecoder]:
    train_ids = gt_dir / f"{stem}_gtFine_labelTrainIds.png"
    label_ids = gt_dir / f"{stem}_gtFine_labelIds.png"
    if label_source in ("auto", "labelTrainIds") and train_ids.is_file():
        return train_ids, decode_train_ids
    if label_source == "labelTrainIds":
        raise DataError(train_ids, "not found (label_source='labelTrainIds')")
    if not label_ids.is_file():
        raise DataError(label_ids, "annotation not found for this image")
    return label_ids, decode_label_ids


def records(root: Path, split: str, label_source: str = "auto") -> list[Record]:
    """Every image of a split, with its annotation when ``gtFine/<split>`` exists."""
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label_source must be one of {', '.join(LABEL_SOURCES)}, got {label_source!r}")
    image_root = root / "leftImg8bit" / split
    if not image_root.is_dir():
        raise DataError(image_root, f"Cityscapes split folder not found (is {root} the Cityscapes folder?)")
    gt_root = root / "gtFine" / split
    out = []
    for path in sorted(image_root.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = path.name[: -len(IMAGE_SUFFIX)]
        mask, decode = (None, None)
        if gt_root.is_dir():
            mask, decode = _annotation(gt_root / path.parent.name, stem, label_source)
        out.append(Record(id=stem, image=path, mask=mask, decode=decode))
    return out


def build(root: Path, split: str, label_source: str = "auto", **options: object) -> Dataset:
    """Samples of one Cityscapes split; ``options``: :class:`StreetOptions` (labelled crops, crops.py)."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"dataset '{NAME}' has no split '{split}'; known: {', '.join(SPLITS)}")
    where = root / "leftImg8bit" / split
    return build_street(
        lambda: records(root, split, label_source), CITYSCAPES, NAME, split, where, DEFAULT_CROP, options
    )


def detect(root: Path) -> bool:
    """A folder holding ``leftImg8bit/<split>/`` for some Cityscapes split."""
    images = Path(root) / "leftImg8bit"
    return any((images / split).is_dir() for split in SPLITS)


SPEC = loader_spec(NAME, CITYSCAPES, build, detect, SPLITS, DESCRIPTION, patch_size=DEFAULT_CROP)
