"""Cutting fully annotated images into patches whose image-level labels come from their masks.

This is the usual way to benchmark WSSS on fully annotated data (``--labels-from-masks``): the
classifier only ever sees each patch's set of present classes, never its mask.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils.data import Dataset

from wsss_domains.domains.contract import LabelSpace, Sample


def grid_starts(length: int, patch: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``; the last window is aligned to the end."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


class PatchDataset(Dataset):
    """Patches of the samples of ``base``, each labelled by the classes present in its mask.

    Patches with no labelled pixel (all ignore / excluded) are dropped. Base samples are cached
    (a small LRU) because consecutive patches come from the same image.
    """

    def __init__(
        self,
        base: Dataset,
        label_space: LabelSpace,
        patch_size: int,
        stride: int | None = None,
        min_pixels: int = 1,
        cache_size: int = 64,
    ) -> None:
        self.base = base
        self.label_space = label_space
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self._cache: OrderedDict[int, Sample] = OrderedDict()
        self._cache_size = cache_size
        self.index: list[tuple[int, int, int, torch.Tensor]] = []
        for i in range(len(base)):  # type: ignore[arg-type]
            sample = self._base(i)
            if "mask" not in sample:
                raise ValueError(f"sample {sample['id']} has no mask; --labels-from-masks needs masks")
            mask = self._scored_mask(sample)
            h, w = mask.shape
            for y in grid_starts(h, patch_size, self.stride):
                for x in grid_starts(w, patch_size, self.stride):
                    crop = mask[y : y + patch_size, x : x + patch_size]
                    if (crop != label_space.ignore_index).any():
                        label = label_space.label_from_mask(crop, min_pixels=min_pixels)
                        self.index.append((i, y, x, label))

    def _scored_mask(self, sample: Sample) -> torch.Tensor:
        mask = sample["mask"]
        if "exclude" in sample:
            mask = mask.masked_fill(sample["exclude"], self.label_space.ignore_index)
        return mask

    def _base(self, i: int) -> Sample:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        sample = self.base[i]
        self._cache[i] = sample
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sample

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Sample:
        i, y, x, label = self.index[k]
        sample = self._base(i)
        p = self.patch_size
        out: Sample = {
            "image": sample["image"][:, y : y + p, x : x + p],
            "label": label,
            "mask": sample["mask"][y : y + p, x : x + p],
            "id": f"{sample['id']}@{y},{x}",
            "meta": {**sample.get("meta", {}), "parent": sample["id"], "offset": (y, x)},
        }
        if "exclude" in sample:
            out["exclude"] = sample["exclude"][y : y + p, x : x + p]
        return out
