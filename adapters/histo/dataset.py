"""The map-style dataset every histology loader returns, and the options all loaders share.

Each loader only lists its files (:class:`Record`) and says how to decode a mask; reading,
size checks, image-level labels from masks, stain normalisation and ``--labels-from-masks``
patching are the same for all of them and live here: :func:`load_split` ends every ``build``,
:class:`HistoOptions` are the keyword options all of them take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.loaders import LoaderOptions, RecordsDataset

from wsss_domains.data.io import DataError, check_same_size, read_rgb
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains.contract import LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Record:
    """One image on disk: its mask (and background mask) if annotated, else its file-name label."""

    id: str
    image: Path
    mask: Path | None = None
    background: Path | None = None
    label: Tensor | None = None


# Turns a record's mask files into (mask with ignore_index, exclude or None).
MaskDecoder = Callable[[Record], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class HistoOptions(LoaderOptions):
    """The keyword options every histology loader's ``build`` understands.

    ``labels_from_masks``: annotated images cut into mask-labelled patches of ``patch_size``
    (default: the dataset's). ``stain_normalize``: Macenko normalisation of every image.
    """

    labels_from_masks: bool = False
    patch_size: int | None = None
    stain_normalize: bool = False


class HistoDataset(RecordsDataset):
    """Samples of one split: image, multi-hot label, and mask / exclude where annotated."""

    def __init__(
        self,
        records: Sequence[Record],
        label_space: LabelSpace,
        decode_mask: MaskDecoder,
        meta: Mapping[str, str],
        stain_normalize: bool = False,
    ) -> None:
        self.records = list(records)
        self.label_space = label_space
        self.decode_mask = decode_mask
        self.meta = dict(meta)
        self.stain_normalize = stain_normalize

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = read_rgb(rec.image)
        if self.stain_normalize:
            from wsss_adapters.histo.stain import normalize_stains  # MONAI: only when asked

            image = normalize_stains(image)
        sample: Sample = {
            "image": image,
            "id": rec.id,
            "meta": {**self.meta, "path": str(rec.image), "stain_normalized": self.stain_normalize},
        }
        if rec.mask is not None:
            mask, exclude = self.decode_mask(rec)
            check_same_size(image, mask, rec.mask)
            sample["mask"] = mask
            if exclude is not None:
                sample["exclude"] = exclude
            # The challenges' convention for annotated splits: the label is the set of classes present.
            sample["label"] = self.label_space.label_from_mask(mask)
        else:
            assert rec.label is not None, "a record without a mask carries a file-name label"
            sample["label"] = rec.label.clone()
        return sample


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name; hidden files skipped; two files of one name refused.

    A sample's id is its file's stem, so ``01.png`` beside ``01.jpg`` would be one sample twice.
    """
    if not folder.is_dir():
        raise DataError(folder, "folder not found")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise DataError(
                path, f"has the same name as {seen[path.stem].name}: one sample id for two images"
            )
        seen[path.stem] = path
    return files


def paired(folder: Path, image: Path, what: str) -> Path:
    """The file of the same name in ``folder`` (a mask beside its image); DataError if missing."""
    path = folder / image.name
    if not path.is_file():
        # Masks are PNG even when images are not.
        alt = folder / f"{image.stem}.png"
        if alt.is_file():
            return alt
        raise DataError(image, f"no {what} for this image (looked for {path})")
    return path


def resolve_split(split: str, splits: Sequence[str], aliases: Mapping[str, str], dataset: str) -> str:
    """The canonical split name; ValueError listing the known ones."""
    name = aliases.get(split, split)
    if name not in splits:
        raise ValueError(f"dataset '{dataset}' has no split '{split}'; known: {', '.join(splits)}")
    return name


def finish(
    dataset: HistoDataset,
    where: Path,
    split: str,
    labels_from_masks: bool,
    patch_size: int | None,
    default_patch_size: int,
) -> Dataset:
    """Refuse empty splits; cut annotated images into mask-labelled patches when asked."""
    if len(dataset) == 0:
        raise DataError(where, f"split '{split}' holds no images")
    if not labels_from_masks:
        return dataset
    if any(rec.mask is None for rec in dataset.records):
        raise DataError(where, f"split '{split}' has no masks; --labels-from-masks needs an annotated split")
    return PatchDataset(dataset, dataset.label_space, patch_size or default_patch_size)


def load_split(
    records: Sequence[Record],
    label_space: LabelSpace,
    decode_mask: MaskDecoder,
    dataset: str,
    split: str,
    where: Path,
    options: Mapping[str, object],
    default_patch_size: int,
) -> Dataset:
    """The listed records of a split as samples, finished as ``options`` ask (see :class:`HistoOptions`)."""
    picked = HistoOptions.pick(options)
    meta = {"dataset": dataset, "split": split}
    histo = HistoDataset(records, label_space, decode_mask, meta, stain_normalize=picked.stain_normalize)
    return finish(histo, where, split, picked.labels_from_masks, picked.patch_size, default_patch_size)
