"""The crop protocol that gives street scenes usable image-level labels.

A whole street image contains nearly every class, so its image-level label says almost nothing.
With ``labels_from_masks=True`` the driving loaders cut each annotated image into a grid of
crops and label every crop by the classes it shows:

* ``crop_size`` -- ``(height, width)`` of a crop, or an int for squares. Defaults per dataset:
  ``120x160`` for CamVid (a 3x3 grid of the 360x480 frame) and ``256x512`` for Cityscapes (a 4x4
  grid of the 1024x2048 frame). The generic ``patch_size`` option, when given alone, means square
  crops of that side.
* ``crop_stride`` -- step between crops (int or pair); default: the crop size (no overlap). The
  last row and column of crops are aligned to the image border, so the whole image is covered.
* ``min_label_fraction`` -- a class is in a crop's label only if it covers at least this fraction
  of the crop's scored (non-ignore) pixels; default ``0.01``, so a few stray pixels at a crop
  border do not become a label. Crops with no scored pixel are dropped. The same threshold
  applies to whole-image labels derived from masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsss_domains.data.patches import PatchDataset
from wsss_domains.data.windows import pair
from wsss_domains.domains.contract import LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DEFAULT_MIN_LABEL_FRACTION = 0.01
# Crops hold only slices of a few images at a time; whole Cityscapes frames are 25 MB each.
_CACHE_IMAGES = 4


@dataclass(frozen=True)
class CropProtocol:
    """Crop size and stride as ``(height, width)``, and the label threshold."""

    size: tuple[int, int]
    stride: tuple[int, int]
    min_label_fraction: float = DEFAULT_MIN_LABEL_FRACTION

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_label_fraction < 1.0:
            raise ValueError(f"min_label_fraction must lie in [0, 1), got {self.min_label_fraction}")


def crop_protocol(
    default_size: tuple[int, int],
    crop_size: int | tuple[int, int] | None = None,
    crop_stride: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
    min_label_fraction: float = DEFAULT_MIN_LABEL_FRACTION,
) -> CropProtocol:
    """Resolve the options: ``crop_size`` wins over ``patch_size``, which wins over the default."""
    if crop_size is not None:
        size = pair(crop_size, "crop_size")
    elif patch_size is not None:
        size = pair(patch_size, "patch_size")
    else:
        size = pair(default_size, "crop_size")
    stride = size if crop_stride is None else pair(crop_stride, "crop_stride")
    return CropProtocol(size=size, stride=stride, min_label_fraction=float(min_label_fraction))


def make_crops(base: Dataset, label_space: LabelSpace, protocol: CropProtocol) -> PatchDataset:
    """The crops of every image of ``base``, each labelled by the classes it shows."""
    return PatchDataset(
        base,
        label_space,
        patch_size=protocol.size,
        stride=protocol.stride,
        min_fraction=protocol.min_label_fraction,
        cache_size=_CACHE_IMAGES,
    )
