"""The layout shared by LUAD-HistoSeg and BCSS-WSSS (released together with WSSS-Tissue).

On disk::

    <root>/
      train/ (or training/)   224 px patches, multi-hot label in the file name
      val/{img,mask}/         annotated patches, masks share the image's file name
      test/{img,mask}/

Masks are palette PNGs: ids ``0..n-1`` the tissue classes, id ``n`` 'white background or exclude'.
The two datasets differ only in classes, palette and how the label is written in the name, so
one :func:`make_spec` serves both and detection tells them apart by those two traits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError
from wsss_adapters.histo.dataset import Record, list_images, load_split, paired, resolve_split
from wsss_adapters.histo.masks import exclude_index_to_ignore, read_checked_mask
from wsss_adapters.histo.naming import label_from_name
from wsss_adapters.loaders import loader_spec

from wsss_domains.data.io import DataError
from wsss_domains.domains.contract import DatasetSpec, LabelSpace

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

SPLITS = ("training", "val", "test")
ALIASES = {"train": "training", "validation": "val", "testing": "test"}
TRAIN_FOLDERS = ("training", "train")  # the release says train/, some copies use training/
PATCH_SIZE = 224  # both datasets' native patch size: labels-from-masks then matches their training labels
_PEEK = 8  # files looked at when detecting


@dataclass(frozen=True)
class TissueLayout:
    """What distinguishes one dataset of this layout."""

    name: str
    label_space: LabelSpace
    # Matches a training file name of this dataset (its label convention).
    train_name: re.Pattern[str]
    description: str

    @property
    def exclude_id(self) -> int:
        return self.label_space.num_classes

    def train_folder(self, root: Path) -> Path | None:
        for name in TRAIN_FOLDERS:
            if (root / name).is_dir():
                return root / name
        return None

    def _is_layout(self, root: Path) -> bool:
        return self.train_folder(root) is not None or any(
            (root / s / "img").is_dir() for s in ("val", "test")
        )

    def _looks_like_mine(self, root: Path) -> bool:
        train = self.train_folder(root)
        if train is not None:
            names = [p.name for p in list_images(train)[:_PEEK]]
            if names:
                return all(self.train_name.search(n) for n in names)
        for split in ("val", "test"):
            masks = list_images(root / split / "mask") if (root / split / "mask").is_dir() else []
            for mask in masks[:1]:
                try:
                    with Image.open(mask) as im:
                        palette = im.getpalette() if im.mode == "P" else None
                except (OSError, UnidentifiedImageError):
                    return False  # unreadable: not recognisable; reading it later names the file
                return palette is not None and tuple(palette[:3]) == self.label_space.palette[0]
        return False

    def _check_not_subfolder(self, root: Path) -> None:
        parent = root.parent
        if (
            root.name in (*TRAIN_FOLDERS, "val", "test")
            and self._is_layout(parent)
            and self._looks_like_mine(parent)
        ):
            raise DataError(
                root,
                f"this is the '{root.name}' sub-folder of a {self.name} dataset; pass its parent {parent}",
            )

    def detect(self, root: Path) -> bool:
        """This layout, with this dataset's file-name label convention or mask palette."""
        root = Path(root)
        self._check_not_subfolder(root)
        return self._is_layout(root) and self._looks_like_mine(root)

    def _decode(self, rec: Record) -> tuple[Tensor, Tensor | None]:
        assert rec.mask is not None
        mask = read_checked_mask(rec.mask, self.exclude_id + 1)
        return exclude_index_to_ignore(mask, self.exclude_id, self.label_space.ignore_index)

    def build(self, root: Path, split: str, **options: object) -> Dataset:
        """Samples of one split (``training``, ``val`` or ``test``); ``options``: :class:`HistoOptions`."""
        root = Path(root)
        self._check_not_subfolder(root)
        split = resolve_split(split, SPLITS, ALIASES, self.name)
        n = self.label_space.num_classes
        if split == "training":
            folder = self.train_folder(root)
            if folder is None:
                raise DataError(root / TRAIN_FOLDERS[1], f"{self.name} training folder not found")
            records = [Record(id=p.stem, image=p, label=label_from_name(p, n)) for p in list_images(folder)]
        else:
            folder = root / split
            if not (folder / "img").is_dir():
                raise DataError(folder / "img", f"{self.name} split folder not found")
            records = [
                Record(id=p.stem, image=p, mask=paired(folder / "mask", p, "mask"))
                for p in list_images(folder / "img")
            ]
        return load_split(
            records, self.label_space, self._decode, self.name, split, folder, options, PATCH_SIZE
        )

    def spec(self) -> DatasetSpec:
        return loader_spec(
            self.name,
            self.label_space,
            self.build,
            self.detect,
            SPLITS,
            self.description,
            patch_size=PATCH_SIZE,
        )
