"""DeepGlobe 2018 land cover: ``train/<id>_sat.jpg`` with ``train/<id>_mask.png`` colour masks.

Classes (mask colour): urban (0,255,255), agriculture (255,255,0), rangeland (255,0,255), forest
(0,255,0), water (0,0,255), barren (255,255,255). The seventh code, unknown (0,0,0), is the
ignore label here, as in the community protocol that leaves it out of scoring. Masks were
JPEG-compressed before being saved as PNG, so each channel is thresholded at 128 before
matching, as the official scripts and torchgeo do.

Splits: ``train`` (annotated), ``valid`` and ``test`` (images only, when their folders exist).
Only ``train`` has masks, so scoring needs a hold-out slice of it: train on ``train[:80%]``,
score ``train[80%:]`` (see :mod:`wsss_domains.data.splits`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing.loading import any_matching, build_split, matching, tile_spec
from wsss_adapters.remote_sensing.scene import Scene

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import ColorCode
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

NAME = "deepglobe"
SPLITS = ("train", "valid", "test")
CLASSES = ("urban", "agriculture", "rangeland", "forest", "water", "barren")
PALETTE = ((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255))
UNKNOWN = (0, 0, 0)
LABEL_SPACE = LabelSpace(CLASSES, PALETTE, BackgroundMode.NONE, ignore_color=UNKNOWN)
CODE = ColorCode({**{c: i for i, c in enumerate(PALETTE)}, UNKNOWN: IGNORE_INDEX}, threshold=128)
DESCRIPTION = "DeepGlobe 2018 land cover (6 classes; unknown = ignore); hold out with train[80%:]"

_SAT = re.compile(r"^(?P<id>.+)_sat\.jpg$", re.IGNORECASE)


def detect(root: Path) -> bool:
    return any_matching((Path(root) / s for s in SPLITS), _SAT)


def scenes(root: Path, split: str) -> list[Scene]:
    """Every ``<id>_sat.jpg`` of the split folder; masks required once any mask is present."""
    folder = Path(root) / split
    images = matching(folder, _SAT)
    annotated = any(folder.glob("*_mask.png"))
    out = []
    for image in images:
        sample_id = _SAT.match(image.name)["id"]  # type: ignore[index]
        mask = folder / f"{sample_id}_mask.png"
        if annotated and not mask.is_file():
            raise DataError(image, f"has no mask (looked for {mask.name}) while other images do")
        out.append(Scene(sample_id, image, mask if annotated else None, {"split": split}))
    return out


def _listed(root: Path, split: str) -> tuple[list[Scene], ColorCode]:
    return scenes(root, split), CODE


def build(root: Path | str, split: str | None = None, **options: object) -> Dataset:
    """One split's samples; ``options``: :class:`TileOptions` (the rest are ignored)."""
    return build_split(
        Path(root), split, options, NAME, SPLITS, LABEL_SPACE, _listed, where=lambda r, s: r / s
    )


SPEC = tile_spec(NAME, LABEL_SPACE, build, detect, SPLITS, DESCRIPTION)
