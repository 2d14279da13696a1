"""The Dubai aerial imagery set (Humans in the Loop / MBRSC): ``Tile <k>/{images,masks}``.

Layout: ``Semantic segmentation dataset/Tile <k>/images/<name>.jpg`` with
``masks/<name>.png``; ``root`` may be the folder holding ``Semantic segmentation dataset`` or
that folder itself. Mask colours (the real ones, not those of ``classes.json``): building
(60,16,152), land (132,41,246), road (110,193,228), vegetation (254,221,58), water
(226,169,41); unlabeled (155,155,155) is the ignore label, and so are the few stray black
pixels some masks hold. Tiles 2 and 4 store palette PNGs, read through their colour table.

Splits select tile groups: ``all``, or a comma-separated list such as ``Tile 1,Tile 2`` (case
and spaces do not matter: ``tile1`` works). Slices hold images out for scoring as for every
loader here: ``all[:80%]`` / ``all[80%:]`` (ids ``tile<k>/<name>`` sort tile by tile, so
``all[-9:]`` is the last tile's images).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing.loading import TileOptions, finish, matching, tile_spec
from wsss_adapters.remote_sensing.scene import Scene

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import ColorCode
from wsss_domains.data.splits import SplitRequest, parse_split
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

NAME = "dubai-aerial"
FOLDER = "Semantic segmentation dataset"
SPLITS = ("all", *(f"Tile {k}" for k in range(1, 9)))
CLASSES = ("building", "land", "road", "vegetation", "water")
PALETTE = ((60, 16, 152), (132, 41, 246), (110, 193, 228), (254, 221, 58), (226, 169, 41))
UNLABELED = (155, 155, 155)
STRAY = (0, 0, 0)
LABEL_SPACE = LabelSpace(CLASSES, PALETTE, BackgroundMode.NONE, ignore_color=UNLABELED)
CODE = ColorCode({**{c: i for i, c in enumerate(PALETTE)}, UNLABELED: IGNORE_INDEX, STRAY: IGNORE_INDEX})
DESCRIPTION = (
    "Dubai aerial (Humans in the Loop); 5 classes, unlabeled = ignore; split 'all' or 'Tile 1,Tile 2'"
)

_TILE = re.compile(r"^tile\s*(?P<k>\d+)$", re.IGNORECASE)
_JPG = re.compile(r"^.+\.jpe?g$", re.IGNORECASE)


def dataset_dir(root: Path) -> Path:
    """The folder holding the ``Tile <k>`` folders."""
    root = Path(root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def tiles(root: Path) -> dict[str, Path]:
    """``tile<k>`` -> folder, for every ``Tile <k>`` folder that has ``images/``."""
    base = dataset_dir(root)
    if not base.is_dir():
        return {}
    out = {}
    for folder in base.iterdir():
        match = _TILE.match(folder.name)
        if match and (folder / "images").is_dir():
            out[f"tile{int(match['k'])}"] = folder
    return dict(sorted(out.items(), key=lambda kv: int(kv[0][4:])))


def detect(root: Path) -> bool:
    return bool(tiles(root))


def _groups(request: SplitRequest, found: dict[str, Path], split: str) -> list[str]:
    if request.base.lower() == "all":
        return list(found)
    keys = []
    for part in request.base.split(","):
        match = _TILE.match(part.strip())
        key = f"tile{int(match['k'])}" if match else None
        if key not in found:
            known = ", ".join(found[k].name for k in found)
            raise ValueError(
                f"dataset '{NAME}' has no tile '{part.strip()}' in split '{split}'; known: all, {known}"
            )
        keys.append(key)
    return list(dict.fromkeys(keys))


def scenes(root: Path, keys: Sequence[str], found: dict[str, Path]) -> list[Scene]:
    out = []
    for key in keys:
        folder = found[key]
        for image in matching(folder / "images", _JPG):
            mask = folder / "masks" / f"{image.stem}.png"
            if not mask.is_file():
                raise DataError(image, f"has no mask (looked for {mask})")
            out.append(Scene(f"{key}/{image.stem}", image, mask, {"split": folder.name, "tile": folder.name}))
    return out


def build(root: Path | str, split: str | None = None, **options: object) -> Dataset:
    """One split's samples; ``options``: :class:`TileOptions` (the rest are ignored)."""
    root = Path(root)
    found = tiles(root)
    if not found:
        raise DataError(root, f"no 'Tile <k>/images' folders here or under '{FOLDER}'")
    text = split if split is not None else "all"
    request = parse_split(text)
    return finish(
        scenes(root, _groups(request, found, text), found),
        request,
        LABEL_SPACE,
        CODE,
        where=dataset_dir(root),
        split=text,
        options=TileOptions.pick(options),
    )


SPEC = tile_spec(NAME, LABEL_SPACE, build, detect, SPLITS, DESCRIPTION)
