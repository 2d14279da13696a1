"""The map-style dataset both driving loaders return: they only list files and decode masks.

:class:`StreetOptions` are the keyword options both loaders take; :func:`build_street` is how
both ``build`` functions end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.driving.crops import DEFAULT_MIN_LABEL_FRACTION, CropProtocol, crop_protocol, make_crops
from wsss_adapters.loaders import LoaderOptions, RecordsDataset

from wsss_domains.data.io import DataError, check_same_size, read_rgb
from wsss_domains.data.patches import label_from_crop
from wsss_domains.domains.contract import LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

# Reads one annotation file as class ids with the ignore index; DataError naming the file.
MaskDecoder = Callable[[Path], "Tensor"]


@dataclass(frozen=True)
class StreetOptions(LoaderOptions):
    """The keyword options both driving loaders' ``build`` understand (see crops.py)."""

    labels_from_masks: bool = False
    patch_size: int | tuple[int, int] | None = None
    crop_size: int | tuple[int, int] | None = None
    crop_stride: int | tuple[int, int] | None = None
    min_label_fraction: float = DEFAULT_MIN_LABEL_FRACTION

    def protocol(self, default_crop: tuple[int, int]) -> CropProtocol:
        """The crop protocol these options ask for, ``default_crop`` unless a size is given."""
        return crop_protocol(
            default_crop, self.crop_size, self.crop_stride, self.patch_size, self.min_label_fraction
        )


@dataclass(frozen=True)
class Record:
    """One image on disk and, when annotated, its mask file and how to decode it."""

    id: str
    image: Path
    mask: Path | None = None
    decode: MaskDecoder | None = None


class StreetDataset(RecordsDataset):
    """Whole street images with their masks; labels are the classes present (see crops.py)."""

    def __init__(
        self,
        records: Sequence[Record],
        label_space: LabelSpace,
        meta: Mapping[str, str],
        min_label_fraction: float = DEFAULT_MIN_LABEL_FRACTION,
    ) -> None:
        self.records = list(records)
        self.label_space = label_space
        self.meta = dict(meta)
        self.min_label_fraction = min_label_fraction

    def load_mask(self, index: int) -> Tensor | None:
        """The decoded mask alone (lets the crop index skip decoding images)."""
        rec = self.records[index]
        if rec.mask is None or rec.decode is None:
            return None
        return rec.decode(rec.mask)

    def __getitem__(self, index: int) -> Sample:
        import torch

        rec = self.records[index]
        image = read_rgb(rec.image)
        sample: Sample = {
            "image": image,
            "id": rec.id,
            "meta": {**self.meta, "path": str(rec.image)},
        }
        mask = self.load_mask(index)
        if mask is None:
            sample["label"] = torch.zeros(len(self.label_space.foreground))
            sample["meta"]["annotated"] = False
            return sample
        check_same_size(image, mask, rec.mask)  # type: ignore[arg-type]
        sample["mask"] = mask
        sample["label"] = label_from_crop(self.label_space, mask, min_fraction=self.min_label_fraction)
        sample["meta"]["annotated"] = True
        return sample


def finish(
    dataset: StreetDataset, where: Path, split: str, labels_from_masks: bool, protocol: CropProtocol
) -> Dataset:
    """Refuse empty splits; cut annotated images into labelled crops when asked."""
    if len(dataset) == 0:
        raise DataError(where, f"split '{split}' holds no images")
    if not labels_from_masks:
        return dataset
    missing = [rec for rec in dataset.records if rec.mask is None]
    if missing:
        raise DataError(
            missing[0].image, f"split '{split}' has images without masks; --labels-from-masks needs masks"
        )
    return make_crops(dataset, dataset.label_space, protocol)


def build_street(
    records: Callable[[], Sequence[Record]],
    label_space: LabelSpace,
    dataset: str,
    split: str,
    where: Path,
    default_crop: tuple[int, int],
    options: Mapping[str, object],
) -> Dataset:
    """Samples of a split: whole images, or labelled crops as ``options`` ask (:class:`StreetOptions`).

    ``records`` lists the split only once the options are known good, so bad options fail first.
    """
    picked = StreetOptions.pick(options)
    protocol = picked.protocol(default_crop)
    meta = {"dataset": dataset, "split": split}
    street = StreetDataset(records(), label_space, meta, min_label_fraction=protocol.min_label_fraction)
    return finish(street, where, split, picked.labels_from_masks, protocol)
