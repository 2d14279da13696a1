"""Several splits of one dataset read as one (``validation[fold!=1/4] + training``).

The parts keep their own form: an annotated part may be cut into mask-labelled patches while a
part without masks (WSSS4LUAD's training patches, labelled by file name) is read whole, so each
stage asks the union which parts it can score (:meth:`SplitUnion.annotated`) rather than assuming
every sample carries a mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from torch.utils.data import ConcatDataset, Dataset, Subset

from wsss_domains.data.large_images import ImageFile, image_file_of
from wsss_domains.data.splits import sample_ids


class SplitUnion(ConcatDataset):
    """The samples of ``parts`` (one per split of the union, in order), with their ids and files."""

    def __init__(self, parts: Sequence[Dataset], names: Sequence[str], annotated: Sequence[bool]) -> None:
        if not len(parts) == len(names) == len(annotated):
            raise ValueError("SplitUnion needs one name and one annotated flag per part")
        super().__init__(list(parts))
        self.names = list(names)
        self.annotated_parts = list(annotated)

    @property
    def parts(self) -> list[Dataset]:
        """The parts' datasets, in order (``ConcatDataset.datasets``)."""
        return list(self.datasets)

    def sample_ids(self) -> list[str]:
        return [sample_id for part in self.parts for sample_id in sample_ids(part)]

    def image_file(self, index: int) -> ImageFile | None:
        part, local = self._locate(index)
        return image_file_of(self.parts[part], local)

    def annotated(self) -> Dataset | None:
        """The parts whose samples carry masks (the ones a score can use), or None if none does."""
        parts = [part for part, flag in zip(self.parts, self.annotated_parts, strict=True) if flag]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def _locate(self, index: int) -> tuple[int, int]:
        """(part, index within it) of a sample, as ``ConcatDataset.__getitem__`` finds it."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return part, index - (self.cumulative_sizes[part - 1] if part else 0)


def image_ids(dataset: Any) -> list[str]:
    """The ids of the whole images under ``dataset`` (a split, a fold of one, or their patches)."""
    if isinstance(dataset, Subset):
        ids = image_ids(dataset.dataset)
        return [ids[int(i)] for i in dataset.indices]
    base = getattr(dataset, "base", None)  # patches: the images they are cut from
    return image_ids(base) if base is not None else sample_ids(dataset)
