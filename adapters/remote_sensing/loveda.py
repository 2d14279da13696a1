"""LoveDA land cover, in its official layout or converted by mmsegmentation.

* official: ``{Train,Val,Test}/{Urban,Rural}/images_png/<n>.png`` with
  ``masks_png/<n>.png`` beside ``images_png`` (no masks for Test);
* mmsegmentation: ``img_dir/{train,val,test}/<n>.png`` and ``ann_dir/{train,val}/<n>.png``.
  The converter only moves files, so the annotations keep the official ids.

Masks store 0 = no-data and 1..7 = background, building, road, water, barren, forest,
agriculture; here 0 becomes the ignore label and 1..7 become class ids 0..6. LoveDA's
"background" is a land-cover class of its own (every pixel has a class), so it is an ordinary
class, not a threshold-decided background. Sample ids are the file stems, which are unique across
Urban and Rural, so both layouts name samples alike. ``scene="urban"`` or ``"rural"`` keeps one
domain (official layout only, where the folder says which).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing.loading import any_matching, build_split, matching, tile_spec, with_masks
from wsss_adapters.remote_sensing.scene import Scene

from wsss_domains.data.mask_codes import IdCode
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

NAME = "loveda"
SPLITS = ("train", "val", "test")
SCENES = ("Urban", "Rural")
CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# The colours of the LoveDA paper's figures.
PALETTE = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)
LABEL_SPACE = LabelSpace(CLASSES, PALETTE, BackgroundMode.NONE, ignore_color=(0, 0, 0))
CODE = IdCode({0: IGNORE_INDEX, **{i + 1: i for i in range(len(CLASSES))}})
DESCRIPTION = "LoveDA (official Train/Val/Test or mmseg img_dir/ann_dir); 7 classes, 0 = no-data"

_PNG = re.compile(r"^\d+\.png$")


def _official(root: Path, split: str) -> Path:
    return root / split.capitalize()


def is_official(root: Path) -> bool:
    return any((_official(root, s) / c / "images_png").is_dir() for s in SPLITS for c in SCENES)


def detect(root: Path) -> bool:
    root = Path(root)
    return is_official(root) or any_matching((root / "img_dir" / s for s in SPLITS), _PNG)


def scenes(root: Path, split: str, scene: str | None = None) -> list[Scene]:
    """The scenes of a split in whichever layout ``root`` holds (official preferred)."""
    if scene is not None and scene.capitalize() not in SCENES:
        raise ValueError(f"scene must be 'urban' or 'rural', got {scene!r}")
    if is_official(root):
        out = []
        for name in SCENES:
            if scene is not None and name != scene.capitalize():
                continue
            folder = _official(root, split) / name
            meta = {"split": split, "scene": name.lower()}
            out.extend(with_masks(matching(folder / "images_png", _PNG), folder / "masks_png", meta))
        return out
    if scene is not None:
        raise ValueError("scene= needs the official LoveDA layout (Urban/Rural folders)")
    images = matching(root / "img_dir" / split, _PNG)
    return with_masks(images, root / "ann_dir" / split, {"split": split})


def build(root: Path | str, split: str | None = None, scene: str | None = None, **options: object) -> Dataset:
    """One split's samples (``scene``: urban or rural only); ``options``: :class:`TileOptions`."""

    def listed(folder: Path, base: str) -> tuple[list[Scene], IdCode]:
        return scenes(folder, base, scene), CODE

    return build_split(Path(root), split, options, NAME, SPLITS, LABEL_SPACE, listed)


SPEC = tile_spec(NAME, LABEL_SPACE, build, detect, SPLITS, DESCRIPTION)
