"""ISPRS 2D semantic labelling (Potsdam, Vaihingen), official or converted by mmsegmentation.

Classes: impervious surface (255,255,255), building (0,0,255), low vegetation (0,255,255), tree
(0,255,0), car (255,255,0), clutter (255,0,0). The boundary-eroded ground truth
(``*_noBoundary.tif``, the one the benchmark scores with) paints a 3-pixel band along class
borders black (0,0,0): the ignore label here.

Official layouts (files found in ``root`` or one folder below it):

* Potsdam: images ``top_potsdam_<i>_<j>_{RGB,IRRG,RGBIR}.tif`` (folders ``2_Ortho_RGB``,
  ``3_Ortho_IRRG``, ``4_Ortho_RGBIR``), labels ``top_potsdam_<i>_<j>_label.tif``
  (``5_Labels_all``) and ``..._label_noBoundary.tif`` (``5_Labels_all_noBoundary``).
  ``modality`` picks the image product (default the first present of RGB, IRRG, RGBIR); with
  RGBIR, ``bands=(4, 1, 2)`` gives the IR-R-G false colour.
* Vaihingen: images ``top/top_mosaic_09cm_area<k>.tif`` (IR-R-G), labels of the same name in
  another folder (``gts_for_participants``, the complete ground truth) or
  ``top_mosaic_09cm_area<k>_noBoundary.tif``.

``eroded`` (default None) prefers the eroded labels where present; True or False insists. Splits
``train`` and ``val`` are the official partition, as mmsegmentation and torchgeo use it.

mmsegmentation layout: ``img_dir/{train,val}/*.png`` and ``ann_dir/{train,val}/*.png`` with 0 =
boundary/ignore and 1..6 = the classes above (class id = stored id - 1). Converted Potsdam names
are ``<i>_<j>_<x0>_<y0>_<x1>_<y1>.png``, Vaihingen ``area<k>_<x0>_<y0>_<x1>_<y1>.png``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing.loading import any_matching, build_split, matching, tile_spec, with_masks
from wsss_adapters.remote_sensing.scene import Scene

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import ColorCode, IdCode, MaskCode
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

if TYPE_CHECKING:
    from torch.utils.data import Dataset

SPLITS = ("train", "val")
CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
BOUNDARY = (0, 0, 0)
LABEL_SPACE = LabelSpace(CLASSES, PALETTE, BackgroundMode.NONE, ignore_color=BOUNDARY)
# Every ISPRS colour is made of 0/255 channels, so thresholding at 128 absorbs the odd off-value
# pixel of the large label tifs while the one unused combination, magenta, still fails loudly.
COLOR_CODE = ColorCode({**{c: i for i, c in enumerate(PALETTE)}, BOUNDARY: IGNORE_INDEX}, threshold=128)
ID_CODE = IdCode({0: IGNORE_INDEX, **{i + 1: i for i in range(len(CLASSES))}})
MODALITIES = ("RGB", "IRRG", "RGBIR")

# The official train/val (torchgeo: train/test) partitions.
POTSDAM_SPLITS = {
    "train": (
        "2_10 2_11 2_12 3_10 3_11 3_12 4_10 4_11 4_12 5_10 5_11 5_12 "
        "6_10 6_11 6_12 6_7 6_8 6_9 7_10 7_11 7_12 7_7 7_8 7_9"
    ).split(),
    "val": "5_15 6_15 6_13 3_13 4_14 6_14 5_14 2_13 4_15 2_14 5_13 4_13 3_14 7_13".split(),
}
VAIHINGEN_SPLITS = {
    "train": [f"area{k}" for k in (1, 11, 13, 15, 17, 21, 23, 26, 28, 3, 30, 32, 34, 37, 5, 7)],
    "val": [f"area{k}" for k in (6, 24, 35, 16, 14, 22, 10, 4, 2, 20, 8, 31, 33, 27, 38, 12, 29)],
}

_POTSDAM_IMAGE = re.compile(r"^top_potsdam_(?P<id>\d+_\d+)_(?P<mod>RGB|IRRG|RGBIR)\.tif$", re.IGNORECASE)
_POTSDAM_LABEL = re.compile(
    r"^top_potsdam_(?P<id>\d+_\d+)_label(?P<eroded>_noBoundary)?\.tif$", re.IGNORECASE
)
_VAIHINGEN_FILE = re.compile(r"^top_mosaic_09cm_(?P<id>area\d+)(?P<eroded>_noBoundary)?\.tif$", re.IGNORECASE)
_POTSDAM_TILE = re.compile(r"^\d+_\d+_\d+_\d+_\d+_\d+\.png$")
_VAIHINGEN_TILE = re.compile(r"^area\d+_\d+_\d+_\d+_\d+\.png$", re.IGNORECASE)


def _shallow(root: Path) -> list[Path]:
    """``root`` and its sub-folders: where the official archives put their files."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [root, *sorted(p for p in root.iterdir() if p.is_dir())]


def _official_files(root: Path, pattern: re.Pattern[str]) -> list[Path]:
    return [f for folder in _shallow(root) for f in matching(folder, pattern)]


def _pick_label(sample_id: str, labels: dict[tuple[str, bool], Path], eroded: bool | None) -> Path | None:
    if eroded is None:
        return labels.get((sample_id, True)) or labels.get((sample_id, False))
    return labels.get((sample_id, eroded))


def _converted(root: Path, split: str, pattern: re.Pattern[str]) -> list[Scene]:
    images = matching(root / "img_dir" / split, pattern)
    return with_masks(images, root / "ann_dir" / split, {"split": split}, what="annotation")


def potsdam_scenes(
    root: Path, split: str, modality: str | None = None, eroded: bool | None = None
) -> tuple[list[Scene], MaskCode]:
    """Scenes of a split and how their masks are coded, in whichever layout ``root`` holds."""
    images = _official_files(root, _POTSDAM_IMAGE)
    if not images:
        return _converted(root, split, _POTSDAM_TILE), ID_CODE
    by_mod: dict[str, dict[str, Path]] = {}
    for path in images:
        m = _POTSDAM_IMAGE.match(path.name)
        by_mod.setdefault(m["mod"].upper(), {})[m["id"]] = path  # type: ignore[index]
    if modality is None:
        modality = next(mod for mod in MODALITIES if mod in by_mod)
    elif modality.upper() not in by_mod:
        raise DataError(root, f"holds no {modality} images (found: {', '.join(sorted(by_mod))})")
    labels = {}
    for path in _official_files(root, _POTSDAM_LABEL):
        m = _POTSDAM_LABEL.match(path.name)
        labels[(m["id"], bool(m["eroded"]))] = path  # type: ignore[index]
    wanted = set(POTSDAM_SPLITS[split])
    out = []
    for sample_id, image in sorted(by_mod[modality.upper()].items()):
        if sample_id in wanted:
            meta = {"split": split, "modality": modality.upper()}
            out.append(Scene(sample_id, image, _pick_label(sample_id, labels, eroded), meta))
    return out, COLOR_CODE


def vaihingen_scenes(root: Path, split: str, eroded: bool | None = None) -> tuple[list[Scene], MaskCode]:
    """Scenes of a split and how their masks are coded, in whichever layout ``root`` holds."""
    files = _official_files(root, _VAIHINGEN_FILE)
    if not files:
        return _converted(root, split, _VAIHINGEN_TILE), ID_CODE
    images: dict[str, Path] = {}
    labels: dict[tuple[str, bool], Path] = {}
    for path in files:
        m = _VAIHINGEN_FILE.match(path.name)
        is_image = path.parent.name.lower() == "top" and not m["eroded"]  # type: ignore[index]
        if is_image:
            images[m["id"]] = path  # type: ignore[index]
        else:
            labels[(m["id"], bool(m["eroded"]))] = path  # type: ignore[index]
    wanted = set(VAIHINGEN_SPLITS[split])
    out = []
    for sample_id, image in sorted(images.items()):
        if sample_id in wanted:
            out.append(Scene(sample_id, image, _pick_label(sample_id, labels, eroded), {"split": split}))
    return out, COLOR_CODE


def _detect(official: re.Pattern[str], converted: re.Pattern[str]) -> Callable[[Path], bool]:
    def detect(root: Path) -> bool:
        root = Path(root)
        return any_matching(_shallow(root), official) or any_matching(
            (root / "img_dir" / s for s in SPLITS), converted
        )

    return detect


def _builder(name: str, lister: Callable[..., tuple[list[Scene], MaskCode]]) -> Callable[..., Dataset]:
    def build(
        root: Path | str, split: str | None = None, eroded: bool | None = None, **options: object
    ) -> Dataset:
        extra = {"modality": options.get("modality")} if name == "potsdam" else {}

        def listed(folder: Path, base: str) -> tuple[list[Scene], MaskCode]:
            return lister(folder, base, eroded=eroded, **extra)

        return build_split(Path(root), split, options, name, SPLITS, LABEL_SPACE, listed)

    build.__doc__ = f"The {name} dataset of a split (see the module docstring for the options)."
    return build


POTSDAM = tile_spec(
    "potsdam",
    LABEL_SPACE,
    _builder("potsdam", potsdam_scenes),
    _detect(_POTSDAM_IMAGE, _POTSDAM_TILE),
    SPLITS,
    "ISPRS Potsdam (official RGB/IRRG/RGBIR tifs or mmseg); 6 classes, eroded boundary = ignore",
)
VAIHINGEN = tile_spec(
    "vaihingen",
    LABEL_SPACE,
    _builder("vaihingen", vaihingen_scenes),
    _detect(_VAIHINGEN_FILE, _VAIHINGEN_TILE),
    SPLITS,
    "ISPRS Vaihingen (official IRRG tifs or mmseg); 6 classes, eroded boundary = ignore",
)
