"""DeepGlobe, LoveDA and ISPRS Potsdam/Vaihingen kept in torchgeo's own on-disk layouts.

Point ``--data`` at the ``root`` you gave torchgeo. The torchgeo dataset class (built with
``checksum=False``, and ``download=False`` where it has that option) lists the files, pairs each
image with its mask and applies torchgeo's own split names. The files are then read by this
plugin's scene reader with the codes of the loader of the same dataset (:mod:`deepglobe`,
:mod:`loveda`, :mod:`isprs`), so class ids, ignore pixels, image-level labels, sample ids and
tiles (``labels_from_masks``, ``patch_size``, ``bands``, ...) are those of that loader.

Pixels are not read with torchgeo's ``__getitem__``: it decodes whole images (no windowed tiles,
no no-data) and turns any colour outside its colormap into class 0 without a word (urban for
DeepGlobe, clutter for ISPRS). The DeepGlobe masks hold JPEG-damaged colours, which the project
thresholds at 128, and a foreign colour should fail. On clean masks both readings agree under
:data:`TORCHGEO_IDS`, which maps torchgeo's ``mask`` ids to this project's (the tests check it).

``ROOT`` is torchgeo's ``root``:

* ``torchgeo-deepglobe`` (``DeepGlobeLandCover``): ``ROOT/data/training_data/images/<id>_sat.jpg``
  and ``ROOT/data/training_data/masks/<id>_mask.png``; ``test_data`` likewise. Splits ``train``
  and ``test``, both annotated (torchgeo's split of the 803 annotated challenge images).
  torchgeo's ids 0..5 are the classes, 6 (unknown, black) is the ignore label.
* ``torchgeo-loveda`` (``LoveDA``): ``ROOT/{Train,Val,Test}/{Urban,Rural}/images_png/<n>.png``
  and ``masks_png/<n>.png`` beside ``images_png`` (Test has no masks). Splits ``train``, ``val``
  and ``test``. ``scene`` is ``"urban"``, ``"rural"`` or both (the default), and every scene
  asked for must be there. Stored 0 (no-data) is ignored, 1..7 become 0..6.
* ``torchgeo-potsdam`` (``Potsdam2D``): ``ROOT/4_Ortho_RGBIR/top_potsdam_<i>_<j>_RGBIR.tif`` and
  ``ROOT/top_potsdam_<i>_<j>_label.tif``, from ``5_Labels_all.zip`` unpacked into ``ROOT``.
* ``torchgeo-vaihingen`` (``Vaihingen2D``): ``ROOT/top/top_mosaic_09cm_area<k>.tif`` and
  ``ROOT/top_mosaic_09cm_area<k>.tif``, from the COMPLETE ground truth unpacked into ``ROOT``.

For both ISPRS sets the splits are ``train`` and ``test`` (the official train/val partition),
torchgeo keeps only images that have a label file, the labels are the full (not eroded) ones,
and torchgeo's clutter (id 0) is this project's class 5 (ids 1..5 become 0..4). A black
boundary pixel, which torchgeo would call clutter, is ignored as in :mod:`isprs`. Potsdam images
have four bands (R, G, B, IR); the first three are read unless ``bands`` says otherwise
(``bands=(4, 1, 2)`` gives IR-R-G).

Archives: when the folder it reads is missing, torchgeo's DeepGlobe, Potsdam and Vaihingen classes
unpack their zips found in ``ROOT``. These loaders never write to the data folder and never
download: a missing folder is a :class:`DataError` that names it and says what torchgeo expects
there, and which archives to unpack if they are present.

Detection: the DeepGlobe layout is recognised from ``data/training_data``. The LoveDA, Potsdam
and Vaihingen layouts are the official ones, which the ``loveda``, ``potsdam`` and ``vaihingen``
loaders already recognise and read (under their own split names). A torchgeo layout is only
recognised where the other loader does not claim the folder, so detection is never ambiguous;
pass ``--dataset torchgeo-<name>`` to get torchgeo's splits.

torchgeo is imported only when a loader builds. It pulls in torch, matplotlib and more, and the
command line must start without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsss_adapters.remote_sensing import deepglobe, isprs, loveda
from wsss_adapters.remote_sensing.loading import build_split, matching, tile_spec
from wsss_adapters.remote_sensing.scene import Scene

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import MaskCode
from wsss_domains.domains.contract import IGNORE_INDEX, DatasetSpec

if TYPE_CHECKING:
    from torch.utils.data import Dataset

# torchgeo's ``mask`` id -> this project's class id (IGNORE_INDEX: not scored), per loader.
_ISPRS_IDS = {0: isprs.CLASSES.index("clutter"), **{i + 1: i for i in range(5)}}
TORCHGEO_IDS: Mapping[str, Mapping[int, int]] = {
    "torchgeo-deepglobe": {**{i: i for i in range(len(deepglobe.CLASSES))}, 6: IGNORE_INDEX},
    "torchgeo-loveda": {0: IGNORE_INDEX, **{i + 1: i for i in range(len(loveda.CLASSES))}},
    "torchgeo-potsdam": _ISPRS_IDS,
    "torchgeo-vaihingen": _ISPRS_IDS,
}


def torchgeo_dataset(class_name: str, root: Path, expects: str, **kwargs: Any) -> Any:
    """torchgeo's ``class_name`` on ``root``; a failure to open it becomes a :class:`DataError`."""
    import torchgeo.datasets  # heavy (torch, matplotlib, ...): only when a loader builds

    cls = getattr(torchgeo.datasets, class_name)
    try:
        return cls(root=str(root), checksum=False, **kwargs)
    except (OSError, AssertionError) as exc:  # DatasetNotFoundError is a FileNotFoundError
        raise DataError(root, f"torchgeo {class_name} cannot open it ({exc}); it expects {expects}") from exc


def _require(
    root: Path, folders: Sequence[Path], class_name: str, expects: str, archives: Sequence[str]
) -> None:
    """A :class:`DataError` on the first missing folder, naming what torchgeo expects in ``root``."""
    if not root.is_dir():
        raise DataError(root, f"is not a folder; torchgeo {class_name} expects {expects}")
    for folder in folders:
        if folder.is_dir():
            continue
        problem = f"holds no torchgeo {class_name} layout: {folder.relative_to(root)}/ is missing;"
        problem += f" torchgeo expects {expects}"
        present = [name for name in archives if (root / name).is_file()]
        if present:
            problem += (
                f". {', '.join(present)} {'is' if len(present) == 1 else 'are'} here: unpack"
                f" {'it' if len(present) == 1 else 'them'} into this folder first (this loader"
                " neither unpacks nor downloads)"
            )
        raise DataError(root, problem)


def _annotated(scenes: list[Scene], class_name: str) -> list[Scene]:
    """The scenes, checking that each mask torchgeo named exists."""
    for scene in scenes:
        if scene.mask is not None and not scene.mask.is_file():
            raise DataError(scene.image, f"has no mask (torchgeo {class_name} looks for {scene.mask})")
    return scenes


def _found(scenes: list[Scene], root: Path, split: str, class_name: str, expects: str) -> list[Scene]:
    if not scenes:
        raise DataError(root, f"torchgeo {class_name} finds no '{split}' image here; it expects {expects}")
    return scenes


def _spec(
    name: str,
    base: DatasetSpec,
    code: MaskCode,
    splits: Sequence[str],
    lister: Callable[..., list[Scene]],
    detect: Callable[[Path], bool],
    description: str,
) -> DatasetSpec:
    """The declaration of the loader ``name``, which reads ``base``'s dataset in torchgeo's layout.

    ``lister(root, split, **options)`` lists a split's scenes (it picks its own options);
    ``detect`` recognises the layout, and the loader claims a folder only if ``base`` does not.
    """

    def build(root: Path | str, split: str | None = None, **options: object) -> Dataset:
        def listed(folder: Path, split_name: str) -> tuple[list[Scene], MaskCode]:
            return lister(folder, split_name, **options), code

        return build_split(Path(root), split, options, name, splits, base.label_space, listed)

    def detect_layout(root: Path) -> bool:
        return detect(Path(root)) and not base.detect(Path(root))

    build.__doc__ = f"One split of {name} (see :mod:`torchgeo_layouts`); options: TileOptions."
    return tile_spec(name, base.label_space, build, detect_layout, splits, description)


# ---------------------------------------------------------------------------------------------
# DeepGlobe

_DEEPGLOBE = "DeepGlobeLandCover"
_DEEPGLOBE_FOLDERS = {"train": "training_data", "test": "test_data"}
_DEEPGLOBE_EXPECTS = (
    "data/training_data/images/<id>_sat.jpg with data/training_data/masks/<id>_mask.png"
    " (test_data likewise), as in torchgeo's data.zip"
)


def deepglobe_scenes(root: Path, split: str, **_: object) -> list[Scene]:
    """The scenes torchgeo's ``DeepGlobeLandCover`` lists for ``split`` (train or test)."""
    root = Path(root)
    if (root / "training_data").is_dir() and not (root / "data").is_dir():
        raise DataError(root, "is torchgeo's DeepGlobe data/ folder itself: pass its parent, torchgeo's root")
    folder = root / "data" / _DEEPGLOBE_FOLDERS[split]
    _require(root, (folder / "images",), _DEEPGLOBE, _DEEPGLOBE_EXPECTS, ("data.zip",))
    dataset = torchgeo_dataset(_DEEPGLOBE, root, _DEEPGLOBE_EXPECTS, split=split)
    scenes = [
        Scene(Path(image).name[: -len("_sat.jpg")], Path(image), Path(mask), {"split": split})
        for image, mask in zip(dataset.image_fns, dataset.mask_fns, strict=True)
    ]
    return _annotated(_found(scenes, root, split, _DEEPGLOBE, _DEEPGLOBE_EXPECTS), _DEEPGLOBE)


def _detect_deepglobe(root: Path) -> bool:
    folders = (root / "data" / f / "images" for f in _DEEPGLOBE_FOLDERS.values())
    return any(matching(f, re.compile(r"^.+_sat\.jpg$")) for f in folders)


DEEPGLOBE = _spec(
    "torchgeo-deepglobe",
    deepglobe.SPEC,
    deepglobe.CODE,
    ("train", "test"),
    deepglobe_scenes,
    _detect_deepglobe,
    "DeepGlobe land cover in torchgeo's layout (data/training_data, data/test_data); as deepglobe",
)


# ---------------------------------------------------------------------------------------------
# LoveDA

_LOVEDA = "LoveDA"
_LOVEDA_EXPECTS = (
    "{Train,Val,Test}/{Urban,Rural}/images_png/<n>.png with masks_png/<n>.png beside images_png"
    " (none for Test), as in torchgeo's Train.zip, Val.zip and Test.zip"
)


def _scene_names(scene: str | Sequence[str] | None) -> list[str]:
    names = ["urban", "rural"] if scene is None else [scene] if isinstance(scene, str) else list(scene)
    names = [n.strip().lower() for part in names for n in part.split(",") if n.strip()]
    if not names or any(n not in ("urban", "rural") for n in names):
        raise ValueError(f"scene must be 'urban', 'rural' or both, got {scene!r}")
    return list(dict.fromkeys(names))


def loveda_scenes(
    root: Path, split: str, scene: str | Sequence[str] | None = None, **_: object
) -> list[Scene]:
    """The scenes torchgeo's ``LoveDA`` lists for ``split`` and ``scene`` (urban, rural or both)."""
    root = Path(root)
    names = _scene_names(scene)
    folders = [root / split.capitalize() / n.capitalize() for n in names]
    archive = f"{split.capitalize()}.zip"
    _require(root, folders, _LOVEDA, _LOVEDA_EXPECTS, (archive,))
    dataset = torchgeo_dataset(_LOVEDA, root, _LOVEDA_EXPECTS, split=split, scene=names, download=False)
    scenes = []
    for files in dataset.files:
        image = Path(files["image"])
        mask = Path(files["mask"]) if "mask" in files else None
        meta = {"split": split, "scene": image.parent.parent.name.lower()}
        scenes.append(Scene(image.stem, image, mask, meta))
    return _annotated(_found(scenes, root, split, _LOVEDA, _LOVEDA_EXPECTS), _LOVEDA)


def _detect_loveda(root: Path) -> bool:
    png = re.compile(r"^.+\.png$")
    return any(
        matching(root / s / c / "images_png", png) for s in ("Train", "Val", "Test") for c in loveda.SCENES
    )


LOVEDA = _spec(
    "torchgeo-loveda",
    loveda.SPEC,
    loveda.CODE,
    ("train", "val", "test"),
    loveda_scenes,
    _detect_loveda,
    "LoveDA as torchgeo reads it ({Train,Val,Test}/{Urban,Rural}); as loveda",
)


# ---------------------------------------------------------------------------------------------
# ISPRS Potsdam and Vaihingen

_POTSDAM = "Potsdam2D"
_POTSDAM_EXPECTS = (
    "4_Ortho_RGBIR/top_potsdam_<i>_<j>_RGBIR.tif and top_potsdam_<i>_<j>_label.tif directly in"
    " the root (4_Ortho_RGBIR.zip and 5_Labels_all.zip unpacked there)"
)
_POTSDAM_ZIPS = ("4_Ortho_RGBIR.zip", "5_Labels_all.zip")
_VAIHINGEN = "Vaihingen2D"
_VAIHINGEN_EXPECTS = (
    "top/top_mosaic_09cm_area<k>.tif and top_mosaic_09cm_area<k>.tif (the complete ground truth)"
    " directly in the root (ISPRS_semantic_labeling_Vaihingen.zip and"
    " ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip unpacked there)"
)
_VAIHINGEN_ZIPS = (
    "ISPRS_semantic_labeling_Vaihingen.zip",
    "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip",
)


def _isprs_scenes(
    root: Path,
    split: str,
    class_name: str,
    image_root: str,
    expects: str,
    archives: Sequence[str],
    sample_id: Callable[[Path], str],
    meta: Mapping[str, str],
) -> list[Scene]:
    root = Path(root)
    _require(root, (root / image_root,), class_name, expects, archives)
    dataset = torchgeo_dataset(class_name, root, expects, split=split)
    scenes = [
        Scene(sample_id(Path(f["image"])), Path(f["image"]), Path(f["mask"]), {"split": split, **meta})
        for f in dataset.files
    ]
    return _found(scenes, root, split, class_name, expects)


def potsdam_scenes(root: Path, split: str, **_: object) -> list[Scene]:
    """The scenes torchgeo's ``Potsdam2D`` lists for ``split`` (train or test), ids ``<i>_<j>``."""

    def sample_id(image: Path) -> str:
        return image.name[len("top_potsdam_") : -len("_RGBIR.tif")]

    return _isprs_scenes(
        root,
        split,
        _POTSDAM,
        "4_Ortho_RGBIR",
        _POTSDAM_EXPECTS,
        _POTSDAM_ZIPS,
        sample_id,
        {"modality": "RGBIR"},
    )


def vaihingen_scenes(root: Path, split: str, **_: object) -> list[Scene]:
    """The scenes torchgeo's ``Vaihingen2D`` lists for ``split`` (train or test), ids ``area<k>``."""

    def sample_id(image: Path) -> str:
        return image.stem[len("top_mosaic_09cm_") :]

    return _isprs_scenes(root, split, _VAIHINGEN, "top", _VAIHINGEN_EXPECTS, _VAIHINGEN_ZIPS, sample_id, {})


def _detect_potsdam(root: Path) -> bool:
    images = matching(root / "4_Ortho_RGBIR", re.compile(r"^top_potsdam_\d+_\d+_RGBIR\.tif$"))
    return bool(images) and bool(matching(root, re.compile(r"^top_potsdam_\d+_\d+_label\.tif$")))


def _detect_vaihingen(root: Path) -> bool:
    tile = re.compile(r"^top_mosaic_09cm_area\d+\.tif$")
    return bool(matching(root / "top", tile)) and bool(matching(root, tile))


POTSDAM = _spec(
    "torchgeo-potsdam",
    isprs.POTSDAM,
    isprs.COLOR_CODE,
    ("train", "test"),
    potsdam_scenes,
    _detect_potsdam,
    "ISPRS Potsdam as torchgeo reads it (4_Ortho_RGBIR + labels in root); train/test; as potsdam",
)
VAIHINGEN = _spec(
    "torchgeo-vaihingen",
    isprs.VAIHINGEN,
    isprs.COLOR_CODE,
    ("train", "test"),
    vaihingen_scenes,
    _detect_vaihingen,
    "ISPRS Vaihingen as torchgeo reads it (top/ + labels in root); train/test; as vaihingen",
)

SPECS = (DEEPGLOBE, LOVEDA, POTSDAM, VAIHINGEN)
