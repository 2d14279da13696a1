"""CamVid in the SegNet layout: ``<split>/``, ``<split>annot/`` and list files ``<split>.txt``.

Each list-file line holds an image and its annotation as absolute SegNet paths
(``/SegNet/CamVid/train/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png``); they
are resolved inside the dataset folder by their last two parts. Without a list file the split
folder is paired with its ``annot`` folder by file stem. Images may be PNG or JPEG; annotations
are grey PNGs with ids 0..10 for the 11 classes and 11 for Unlabelled, which becomes ignore.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from wsss_adapters.driving.dataset import Record, build_street
from wsss_adapters.driving.labels import CAMVID, CAMVID_UNLABELLED
from wsss_adapters.loaders import loader_spec

from wsss_domains.data.io import DataError, read_index_mask

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

NAME = "camvid"
SPLITS = ("train", "val", "test")
DEFAULT_CROP = (120, 160)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DESCRIPTION = "CamVid, SegNet layout: 11 classes, Unlabelled ignored"


def decode_mask(path: Path) -> Tensor:
    """An annotation PNG with Unlabelled (11) turned into the ignore index."""
    import torch

    ids = read_index_mask(path).numpy()  # numpy: cheaper than torch ops for per-file work
    ignore = CAMVID.ignore_index
    bad = (ids > CAMVID_UNLABELLED) & (ids != ignore)
    if bad.any():
        raise DataError(path, f"holds id {int(ids[bad][0])}; CamVid ids are 0..10 and 11 (Unlabelled)")
    ids[ids == CAMVID_UNLABELLED] = ignore
    return torch.from_numpy(ids)


def _inside(root: Path, listed: str) -> Path:
    """A SegNet absolute path re-rooted at ``root`` by its last two parts (never leaving ``root``)."""
    parts = PurePosixPath(listed.replace("\\", "/")).parts[-2:]
    if any(part in ("..", ".") for part in parts):
        raise ValueError(f"list entry '{listed}' leads outside the dataset folder {root}")
    return root.joinpath(*parts)


def _existing_image(path: Path) -> Path:
    """The listed image, or the same stem with another image suffix (re-encoded copies)."""
    if path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:
        alt = path.with_suffix(suffix)
        if alt.is_file():
            return alt
    raise DataError(path, "image listed in the split file not found")


def read_list(root: Path, list_file: Path) -> list[Record]:
    """Records of a SegNet list file; errors name the file and line."""
    out = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(list_file, f"line {number}: expected 'IMAGE ANNOTATION', got {line!r}")
        image = _existing_image(_inside(root, fields[0]))
        mask = _inside(root, fields[1])
        if not mask.is_file():
            raise DataError(mask, f"annotation listed in {list_file.name} line {number} not found")
        out.append(Record(id=image.stem, image=image, mask=mask, decode=decode_mask))
    return out


def pair_folders(root: Path, split: str) -> list[Record]:
    """Records of ``<split>/`` paired by stem with ``<split>annot/`` (no list file)."""
    images = root / split
    if not images.is_dir():
        raise DataError(images, f"neither {split}.txt nor the {split}/ folder found (is {root} CamVid?)")
    annot = root / f"{split}annot"
    out = []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = annot / f"{image.stem}.png"
        if annot.is_dir() and not mask.is_file():
            raise DataError(image, f"no annotation for this image (looked for {mask})")
        has_mask = annot.is_dir()
        out.append(
            Record(
                id=image.stem,
                image=image,
                mask=mask if has_mask else None,
                decode=decode_mask if has_mask else None,
            )
        )
    return out


def records(root: Path, split: str) -> list[Record]:
    list_file = root / f"{split}.txt"
    return read_list(root, list_file) if list_file.is_file() else pair_folders(root, split)


def build(root: Path, split: str, **options: object) -> Dataset:
    """Samples of one CamVid split; ``options``: :class:`StreetOptions` (labelled crops, crops.py)."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"dataset '{NAME}' has no split '{split}'; known: {', '.join(SPLITS)}")
    return build_street(lambda: records(root, split), CAMVID, NAME, split, root, DEFAULT_CROP, options)


def detect(root: Path) -> bool:
    """A folder with a SegNet list file or a ``<split>/`` + ``<split>annot/`` pair."""
    root = Path(root)
    return any(
        (root / f"{s}annot").is_dir() and ((root / f"{s}.txt").is_file() or (root / s).is_dir())
        for s in SPLITS
    )


SPEC = loader_spec(NAME, CAMVID, build, detect, SPLITS, DESCRIPTION, patch_size=DEFAULT_CROP)
