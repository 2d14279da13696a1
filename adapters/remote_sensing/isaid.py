"""iSAID in its semantic form: ``<split>/images/P<n>.png`` and ``P<n>_instance_color_RGB.png``.

The semantic masks (the ``Semantic_masks`` archives) colour every pixel by class with the iSAID
devkit's table: background (0,0,0), ship (0,0,63), storage tank (0,63,63), baseball diamond
(0,63,0), tennis court (0,63,127), basketball court (0,63,191), ground track field (0,63,255),
bridge (0,127,63), large vehicle (0,127,127), small vehicle (0,0,127), helicopter (0,0,191),
swimming pool (0,0,255), roundabout (0,191,127), soccer ball field (0,127,191), plane
(0,127,255), harbor (0,100,155). A mask is looked for in ``<split>/Semantic_masks/images/``,
``<split>/Semantic_masks/`` and beside the image. Splits ``train`` and ``val`` (``test`` has
images only). Scenes reach several thousand pixels a side, so tile them (``patch_size``).

Also read: the mmsegmentation-converted crops ``img_dir/<split>/P<n>_<y0>_<y1>_<x0>_<x1>.png``
with ``ann_dir/<split>/<same stem>_instance_color_RGB.png`` holding class ids 0..15 (255 pad).

Unlike the land-cover sets, iSAID's background is not a land-cover class but whatever lies
between the 15 object categories, present in every tile; so it is decided by threshold, as in
VOC, rather than predicted by the classifier.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing.loading import any_matching, build_split, matching, tile_spec, with_masks
from wsss_adapters.remote_sensing.scene import Scene

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import ColorCode, IdCode, MaskCode
from wsss_domains.domains.contract import BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

NAME = "isaid"
SPLITS = ("train", "val", "test")
CLASSES = (
    "background",
    "ship",
    "storage_tank",
    "baseball_diamond",
    "tennis_court",
    "basketball_court",
    "ground_track_field",
    "bridge",
    "large_vehicle",
    "small_vehicle",
    "helicopter",
    "swimming_pool",
    "roundabout",
    "soccer_ball_field",
    "plane",
    "harbor",
)
PALETTE = (
    (0, 0, 0),
    (0, 0, 63),
    (0, 63, 63),
    (0, 63, 0),
    (0, 63, 127),
    (0, 63, 191),
    (0, 63, 255),
    (0, 127, 63),
    (0, 127, 127),
    (0, 0, 127),
    (0, 0, 191),
    (0, 0, 255),
    (0, 191, 127),
    (0, 127, 191),
    (0, 127, 255),
    (0, 100, 155),
)
LABEL_SPACE = LabelSpace(CLASSES, PALETTE, BackgroundMode.THRESHOLD, background_index=0)
COLOR_CODE = ColorCode({c: i for i, c in enumerate(PALETTE)})
ID_CODE = IdCode.identity(len(CLASSES))
MASK_SUFFIX = "_instance_color_RGB.png"
DESCRIPTION = "iSAID semantic masks (15 object classes + threshold background); official or mmseg crops"

_IMAGE = re.compile(r"^P\d+\.png$", re.IGNORECASE)
_CROP = re.compile(r"^P\d+_\d+_\d+_\d+_\d+\.png$", re.IGNORECASE)


def _official(root: Path) -> bool:
    return any_matching((root / s / "images" for s in SPLITS), _IMAGE)


def detect(root: Path) -> bool:
    root = Path(root)
    return _official(root) or any_matching((root / "img_dir" / s for s in SPLITS), _CROP)


def _find_mask(split_dir: Path, image: Path) -> Path | None:
    name = image.stem + MASK_SUFFIX
    for folder in (split_dir / "Semantic_masks" / "images", split_dir / "Semantic_masks", image.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def scenes(root: Path, split: str) -> tuple[list[Scene], MaskCode]:
    """Scenes of a split and how their masks are coded, in whichever layout ``root`` holds."""
    if _official(root):
        split_dir = root / split
        images = matching(split_dir / "images", _IMAGE)
        masks = [_find_mask(split_dir, image) for image in images]
        if any(m is not None for m in masks) and any(m is None for m in masks):
            missing = images[masks.index(None)]
            raise DataError(missing, f"has no semantic mask ({missing.stem}{MASK_SUFFIX}) while others do")
        meta = {"split": split}
        return [Scene(i.stem, i, m, meta) for i, m in zip(images, masks, strict=True)], COLOR_CODE
    images = matching(root / "img_dir" / split, _CROP)
    return with_masks(images, root / "ann_dir" / split, {"split": split}, MASK_SUFFIX, "annotation"), ID_CODE


def build(root: Path | str, split: str | None = None, **options: object) -> Dataset:
    """One split's samples; ``options``: :class:`TileOptions` (the rest are ignored)."""
    return build_split(Path(root), split, options, NAME, SPLITS, LABEL_SPACE, scenes)


SPEC = tile_spec(NAME, LABEL_SPACE, build, detect, SPLITS, DESCRIPTION)
