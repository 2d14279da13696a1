"""Cutting fully annotated images into patches whose image-level labels come from their masks.

This is the usual way to benchmark WSSS on fully annotated data (``--labels-from-masks``): the
classifier only ever sees each patch's set of present classes, never its mask.

Patches may be square (``patch_size=224``) or rectangular (``patch_size=(120, 160)``, height then
width), because street scenes are wide. A class counts as present in a patch when it covers at
least ``min_pixels`` pixels and at least ``min_fraction`` of the patch's scored (non-ignore)
pixels, so that a sliver of a few pixels at a crop border does not become an image-level label.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from wsss_domains.data.windows import grid_starts, pair, random_start
from wsss_domains.domains.contract import LabelSpace, Sample

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset


def label_from_crop(
    label_space: LabelSpace, mask: torch.Tensor, min_pixels: int = 1, min_fraction: float = 0.0
) -> torch.Tensor:
    """Multi-hot label of ``mask``: classes covering ``min_pixels`` and ``min_fraction`` of scored pixels.

    Counted in numpy: indexing builds thousands of crops, and torch's per-op overhead dominates there.
    """
    import torch  # here, not at the top: the plugins' loaders import this module while listing domains

    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must lie in [0, 1], got {min_fraction}")
    ids = mask.detach().cpu().numpy()
    scored = ids[ids != label_space.ignore_index]
    if scored.size and (scored.min() < 0 or scored.max() >= label_space.num_classes):
        bad = scored[(scored < 0) | (scored >= label_space.num_classes)][0]
        raise ValueError(f"mask holds class id {bad}, outside 0..{label_space.num_classes - 1}")
    counts = np.bincount(scored.astype(np.int64), minlength=label_space.num_classes)
    need = max(min_pixels, math.ceil(min_fraction * scored.size))
    return torch.from_numpy((counts[list(label_space.foreground)] >= need).astype(np.float32))


def window_sample(sample: Sample, y: int, x: int, size: tuple[int, int], label: torch.Tensor) -> Sample:
    """The ``size`` window of ``sample`` at ``(y, x)`` as a sample of its own, id ``parent@y,x``."""
    ph, pw = size
    out: Sample = {
        "image": sample["image"][:, y : y + ph, x : x + pw],
        "label": label,
        "mask": sample["mask"][y : y + ph, x : x + pw],
        "id": f"{sample['id']}@{y},{x}",
        "meta": {**sample.get("meta", {}), "parent": sample["id"], "offset": (y, x)},
    }
    if "exclude" in sample:
        out["exclude"] = sample["exclude"][y : y + ph, x : x + pw]
    return out


class PatchDataset:
    """Patches of the samples of ``base``, each labelled by the classes present in its mask.

    A map-style dataset, not derived from torch's ``Dataset`` (see ``RecordsDataset`` in the plugins).

    Patches with no labelled pixel (all ignore / excluded) are dropped. Base samples are cached
    (a small LRU) because consecutive patches come from the same image. When ``base`` has a
    ``load_mask(i)`` method returning the scored mask (ignore where excluded), the index is built
    from masks alone, without decoding every image up front.
    """

    def __init__(
        self,
        base: Dataset,
        label_space: LabelSpace,
        patch_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        min_pixels: int = 1,
        cache_size: int = 64,
        min_fraction: float = 0.0,
    ) -> None:
        self.base = base
        self.label_space = label_space
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self.patch_hw = pair(patch_size)
        self.stride_hw = pair(self.stride, "stride")
        self.min_pixels = min_pixels
        self.min_fraction = min_fraction
        self._cache: OrderedDict[int, Sample] = OrderedDict()
        self._cache_size = cache_size

    @cached_property
    def index(self) -> list[tuple[int, int, int, torch.Tensor]]:
        """(image, top, left, label) of every kept patch, built on first use: a loader's patching that
        is only :meth:`recut` over other images (a fold, a denser stride) never reads its own masks."""
        import torch

        index: list[tuple[int, int, int, torch.Tensor]] = []
        ph, pw = self.patch_hw
        sh, sw = self.stride_hw
        base, label_space = self.base, self.label_space
        load_mask = getattr(base, "load_mask", None)
        for i in range(len(base)):  # type: ignore[arg-type]
            if callable(load_mask):
                mask = load_mask(i)
                if mask is None:
                    raise ValueError(
                        f"sample {i} of {type(base).__name__} has no mask; --labels-from-masks needs masks"
                    )
            else:
                sample = self._base(i)
                if "mask" not in sample:
                    raise ValueError(f"sample {sample['id']} has no mask; --labels-from-masks needs masks")
                mask = self._scored_mask(sample)
            ids = mask.cpu().numpy()
            h, w = ids.shape
            for y in grid_starts(h, ph, sh):
                for x in grid_starts(w, pw, sw):
                    crop = ids[y : y + ph, x : x + pw]
                    if (crop != label_space.ignore_index).any():
                        label = label_from_crop(
                            label_space, torch.from_numpy(crop), self.min_pixels, self.min_fraction
                        )
                        index.append((i, y, x, label))
        return index

    def recut(self, base: Dataset, stride: int | tuple[int, int] | None = None) -> PatchDataset:
        """The same patching (size, label rule) over other images, e.g. a fold of these; the same
        stride unless ``stride`` is given (denser windows cut by the same rule)."""
        return PatchDataset(
            base,
            self.label_space,
            self.patch_size,
            self.stride if stride is None else stride,
            min_pixels=self.min_pixels,
            cache_size=self._cache_size,
            min_fraction=self.min_fraction,
        )

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

    def class_sets(self, min_share: float = 0.0) -> list[set[int]]:
        """Each patch's foreground classes (its label; ``min_share`` is the patching's own)."""
        return [{int(c) for c in label.nonzero().flatten()} for _, _, _, label in self.index]

    def __getitem__(self, k: int) -> Sample:
        i, y, x, label = self.index[k]
        return window_sample(self._base(i), y, x, self.patch_hw, label)


class RandomPatchDataset:
    """``per_image`` windows drawn at random positions from each image, labelled from their masks.

    A grid cuts a 300 px region into a handful of near-identical 224 px patches; drawing fresh
    windows on every access shows the classifier many more distinct class mixtures (and more
    single-class windows) from the same annotated images, at their native magnification. Each
    window's label is derived from its own mask exactly as in :class:`PatchDataset`; images smaller
    than the window give their whole extent. Windows holding no scored pixel are redrawn.
    """

    def __init__(
        self,
        base: Dataset,
        label_space: LabelSpace,
        patch_size: int | tuple[int, int],
        per_image: int = 16,
        min_pixels: int = 1,
        min_fraction: float = 0.0,
        cache_size: int = 64,
        max_draws: int = 20,
    ) -> None:
        if per_image < 1:
            raise ValueError(f"per_image must be at least 1, got {per_image}")
        self.base = base
        self.label_space = label_space
        self.patch_hw = pair(patch_size)
        self.per_image = per_image
        self.min_pixels = min_pixels
        self.min_fraction = min_fraction
        self.max_draws = max_draws
        self._cache: OrderedDict[int, tuple[Sample, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self.base) * self.per_image  # type: ignore[arg-type]

    def class_sets(self, min_share: float = 0.0) -> list[set[int]]:
        """Each window's foreground classes, taken as its image's (windows are drawn afresh each time)."""
        per_image = []
        for i in range(len(self.base)):  # type: ignore[arg-type]
            label = label_from_crop(self.label_space, self._load(i)[1], self.min_pixels, min_share)
            per_image.append({int(c) for c in label.nonzero().flatten()})
        return [per_image[k // self.per_image] for k in range(len(self))]

    def _load(self, i: int) -> tuple[Sample, torch.Tensor]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        sample = self.base[i]
        if "mask" not in sample:
            raise ValueError(f"sample {sample['id']} has no mask; --labels-from-masks needs masks")
        scored = sample["mask"]
        if "exclude" in sample:
            scored = scored.masked_fill(sample["exclude"], self.label_space.ignore_index)
        self._cache[i] = (sample, scored)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sample, scored

    def __getitem__(self, k: int) -> Sample:
        if not 0 <= k < len(self):
            raise IndexError(k)
        sample, scored = self._load(k // self.per_image)
        h, w = scored.shape
        ph, pw = min(self.patch_hw[0], h), min(self.patch_hw[1], w)
        for _ in range(self.max_draws):
            y, x = random_start(h, ph), random_start(w, pw)
            crop = scored[y : y + ph, x : x + pw]
            if (crop != self.label_space.ignore_index).any():
                break
        else:
            raise ValueError(f"sample {sample['id']}: no window of {ph}x{pw} holds a scored pixel")
        label = label_from_crop(self.label_space, crop, self.min_pixels, self.min_fraction)
        return window_sample(sample, y, x, (ph, pw), label)
