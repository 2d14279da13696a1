"""What the VOC and COCO loaders share: assembling a sample, and checking ``build``'s choices.

Both datasets label an image by its annotation (VOC's XML, COCO's instances) when it has one and
by its mask otherwise; only how a record's mask and annotated label are read differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from wsss_adapters.loaders import RecordsDataset

from wsss_domains.data.io import DataError, check_same_size, read_rgb
from wsss_domains.domains.contract import LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor


class NaturalRecord(Protocol):
    """What the shared sample assembly reads of a loader's record."""

    @property
    def id(self) -> str: ...

    @property
    def image(self) -> Path: ...

    @property
    def mask(self) -> Path | None: ...


class NaturalDataset(RecordsDataset):
    """Images of one split with their mask (when there is one) and image-level label.

    Subclasses name their dataset's fixed ``label_space``, decode a mask (:meth:`load_mask`) and
    read the annotated label (:meth:`annotation_label`); the mask's classes stand in for a
    missing annotation.
    """

    label_space: LabelSpace
    # The annotation an image lacks, as the error for an image with neither it nor a mask names it.
    annotation = "annotation"

    def __init__(self, records: Any, label_source: str, meta: dict[str, str]) -> None:
        self.records = records
        self.label_source = label_source
        self.meta = meta

    def load_mask(self, index: int) -> Tensor | None:
        """The decoded mask of a record, None where it has none (lets patching skip images)."""
        raise NotImplementedError

    def annotation_label(self, rec: Any) -> Tensor | None:
        """The label the record's annotation gives, None where it has none or is not to be used."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        rec: NaturalRecord = self.records[index]
        image = read_rgb(rec.image)
        sample: Sample = {"image": image, "id": rec.id, "meta": {**self.meta, "path": str(rec.image)}}
        mask = self.load_mask(index)
        if mask is not None:
            check_same_size(image, mask, rec.mask or rec.image)
            sample["mask"] = mask
        label = self.annotation_label(rec)
        if label is not None:
            sample["label"] = label
        elif mask is not None:
            sample["label"] = self.label_space.label_from_mask(mask)
        else:
            raise DataError(rec.image, f"no {self.annotation} and no mask: no image-level label")
        return sample


def check_choices(
    dataset: str, split: str, splits: Sequence[str], label_source: str, label_sources: Sequence[str]
) -> None:
    """Refuse an unknown split or label source before anything is read."""
    if split not in splits:
        raise ValueError(f"dataset '{dataset}' has no split '{split}'; known: {', '.join(splits)}")
    if label_source not in label_sources:
        raise ValueError(f"label_source must be one of {', '.join(label_sources)}, got {label_source!r}")
