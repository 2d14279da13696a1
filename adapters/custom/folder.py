"""The generic folder format (loader ``folder``): see docs/folder-format.md.

::

    my-data/
      classes.json | classes.txt     class names, optional colours, background class and mode
      images/<name>.<png|jpg|...>    the images
      masks/<stem>.png               optional: class-id PNGs (or RGB in the class colours)
      labels.csv                     optional: image,labels (needed for images without a mask)
      exclude/<stem>.png             optional: non-zero where pixels are excluded / no-data
      splits/<split>.txt             optional: image names (or stems) of each split

The split ``all`` is every image; any other split needs ``splits/<split>.txt``. An image's label
comes from ``labels.csv`` when listed there, else from the classes present in its mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.custom.classes import class_file, read_label_space
from wsss_adapters.custom.labels_csv import read_labels_csv
from wsss_adapters.loaders import RecordsDataset

from wsss_domains.data.io import DataError, check_same_size, read_index_mask, read_mask, read_rgb
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains.contract import DatasetSpec, LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

    from wsss_domains.data.large_images import ImageFile

NAME = "folder"
SPLITS = ("all", "train", "val", "test")
LABEL_SOURCES = ("auto", "csv", "mask")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PATCH_SIZE = 224


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    mask: Path | None = None
    exclude: Path | None = None
    label: Tensor | None = None  # from labels.csv


def decode_mask(path: Path, label_space: LabelSpace) -> Tensor:
    """Class ids from an index PNG, or from an RGB PNG in the class colours."""
    colors = {rgb: i for i, rgb in enumerate(label_space.palette)}
    colors.setdefault(label_space.ignore_color, label_space.ignore_index)
    ids = read_mask(path, colors)
    bad = (ids >= label_space.num_classes) & (ids != label_space.ignore_index)
    if bad.any():
        raise DataError(
            path,
            f"holds class id {int(ids[bad][0])}; classes.json declares ids 0..{label_space.num_classes - 1}"
            f" (ignore {label_space.ignore_index})",
        )
    return ids


class FolderDataset(RecordsDataset):
    """Images of one split of a custom folder, with labels, masks and exclude masks."""

    def __init__(
        self, records: list[Record], label_space: LabelSpace, label_source: str, meta: dict[str, str]
    ) -> None:
        self.records = records
        self.label_space = label_space
        self.label_source = label_source
        self.meta = meta

    def _masks(self, index: int) -> tuple[Tensor | None, Tensor | None]:
        rec = self.records[index]
        mask = None if rec.mask is None else decode_mask(rec.mask, self.label_space)
        exclude = None
        if rec.exclude is not None:
            exclude = read_index_mask(rec.exclude) != 0
            if mask is not None:
                check_same_size(mask, exclude, rec.exclude)
                mask = mask.masked_fill(exclude, self.label_space.ignore_index)
        return mask, exclude

    def load_mask(self, index: int) -> Tensor | None:
        return self._masks(index)[0]

    def image_file(self, index: int) -> ImageFile | None:
        """The image's file and labels without decoding it (large images go window by window).

        None where an exclude mask applies: that path reads masks whole.
        """
        from wsss_domains.data.large_images import ImageFile  # rasterio: only for large images

        rec = self.records[index]
        if rec.exclude is not None:
            return None
        label = rec.label.clone() if rec.label is not None and self.label_source != "mask" else None
        return ImageFile(rec.id, rec.image, label, rec.mask)

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = read_rgb(rec.image)
        sample: Sample = {"image": image, "id": rec.id, "meta": {**self.meta, "path": str(rec.image)}}
        mask, exclude = self._masks(index)
        if mask is not None:
            check_same_size(image, mask, rec.mask)  # type: ignore[arg-type]
            sample["mask"] = mask
        if exclude is not None:
            check_same_size(image, exclude, rec.exclude)  # type: ignore[arg-type]
            sample["exclude"] = exclude
        if rec.label is not None and self.label_source != "mask":
            sample["label"] = rec.label.clone()
        elif mask is not None and self.label_source != "csv":
            sample["label"] = self.label_space.label_from_mask(mask)
        else:
            raise DataError(rec.image, f"no image-level label (label_source={self.label_source!r})")
        return sample


def _list_images(root: Path) -> list[Path]:
    folder = root / "images"
    if not folder.is_dir():
        raise DataError(folder, "images/ folder not found")
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _select(root: Path, images: list[Path], split: str) -> list[Path]:
    if split == "all":
        return images
    list_file = root / "splits" / f"{split}.txt"
    if not list_file.is_file():
        known = sorted(p.stem for p in (root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
        raise DataError(list_file, f"split list not found; splits here: {', '.join(['all', *known])}")
    by_name = {p.name: p for p in images} | {p.stem: p for p in images}
    out = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name not in by_name:
            raise DataError(list_file, f"line {number}: image {name!r} not found in images/")
        out.append(by_name[name])
    return out


def records(root: Path, split: str, label_space: LabelSpace, label_source: str = "auto") -> list[Record]:
    """Records of a split, each image paired with its mask, exclude mask and CSV label."""
    images = _list_images(root)
    csv_path = root / "labels.csv"
    labels = read_labels_csv(csv_path, label_space) if csv_path.is_file() else {}
    known = {p.name for p in images} | {p.stem for p in images}
    for name in labels:
        if name not in known:
            raise DataError(csv_path, f"image {name!r} not found in images/")
    out = []
    for image in _select(root, images, split):
        mask = root / "masks" / f"{image.stem}.png"
        exclude = root / "exclude" / f"{image.stem}.png"
        out.append(
            Record(
                id=image.stem,
                image=image,
                mask=mask if mask.is_file() else None,
                exclude=exclude if exclude.is_file() else None,
                label=labels.get(image.name, labels.get(image.stem)),
            )
        )
        rec = out[-1]
        if (rec.label is None or label_source == "mask") and (rec.mask is None or label_source == "csv"):
            raise DataError(image, f"no label: not in labels.csv and no mask (label_source={label_source!r})")
    return out


def build(
    root: Path,
    split: str = "all",
    labels_from_masks: bool = False,
    patch_size: int | tuple[int, int] | None = None,
    label_source: str = "auto",
    **_: object,
) -> Dataset:
    """Samples of one split of a custom folder dataset."""
    root = Path(root)
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label_source must be one of {', '.join(LABEL_SOURCES)}, got {label_source!r}")
    label_space = read_label_space(root)
    dataset = FolderDataset(
        records(root, split, label_space, label_source),
        label_space,
        label_source,
        {"dataset": NAME, "split": split},
    )
    if len(dataset) == 0:
        raise DataError(root / "images", f"split '{split}' holds no images")
    if not labels_from_masks:
        return dataset
    if any(rec.mask is None for rec in dataset.records):
        raise DataError(
            root / "masks", f"split '{split}' has images without masks; --labels-from-masks needs masks"
        )
    return PatchDataset(dataset, label_space, patch_size or PATCH_SIZE)


def detect(root: Path) -> bool:
    root = Path(root)
    return class_file(root) is not None and (root / "images").is_dir()


# The classes live in the folder, so this label space is only a placeholder; the engine asks
# SPEC.label_space_for(root), which reads classes.json.
_PLACEHOLDER = LabelSpace(classes=("<declared in classes.json>",), palette=((0, 0, 0),))

SPEC = DatasetSpec(
    name=NAME,
    label_space=_PLACEHOLDER,
    build=build,
    detect=detect,
    splits=SPLITS,
    description="Generic folder: classes.json, images/, masks/ or labels.csv, splits/*.txt",
    default_split="all",
    patch_size=PATCH_SIZE,
    label_space_from=read_label_space,
)
