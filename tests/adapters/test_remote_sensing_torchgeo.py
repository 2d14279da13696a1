"""The torchgeo-layout loaders, each on a tiny copy of the layout torchgeo's dataset class reads.

Like torchgeo's own tests (``tests/data/<dataset>/data.py``), each test writes a few small images
and masks where torchgeo expects them. The expected class ids come from the ids the test painted,
not from the loaders. They are checked against the project's loader of the same dataset and
against torchgeo's own ``__getitem__``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from wsss_adapters.remote_sensing import RemoteSensingDomain, deepglobe, isprs, loveda, torchgeo_layouts

from wsss_domains.data.io import DataError
from wsss_domains.domains.contract import IGNORE_INDEX

torchgeo_datasets = pytest.importorskip("torchgeo.datasets")

# ---------------------------------------------------------------------------------------------
# tiny files


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_jpg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=95)
    return path


def write_tif(path: Path, bands: np.ndarray) -> Path:
    """A georeferenced uint8 GeoTIFF from a ``C x H x W`` array, as the ISPRS tiles are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = bands.shape
    profile = dict(
        driver="GTiff",
        height=height,
        width=width,
        count=count,
        dtype="uint8",
        crs="EPSG:32633",
        transform=rasterio.Affine(0.05, 0.0, 366976.5, 0.0, -0.05, 5808562.6),
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(bands.astype(np.uint8)))
    return path


def photo(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def quadrants(ids: tuple[int, int, int, int], size: int = 32) -> np.ndarray:
    """A ``size x size`` id map whose quadrants hold ``ids`` (top-left, top-right, bottom-left, bottom-right)."""
    h = size // 2
    out = np.empty((size, size), dtype=np.int64)
    out[:h, :h], out[:h, h:], out[h:, :h], out[h:, h:] = ids
    return out


def paint(ids: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(colours, dtype=np.uint8)[ids]


def multi_hot(mask: np.ndarray, num_classes: int) -> list[int]:
    present = set(np.unique(mask).tolist()) - {IGNORE_INDEX}
    return [int(c in present) for c in range(num_classes)]


def expected_tiles(mask: np.ndarray, tile: int, num_classes: int) -> list[tuple[tuple[int, int], list[int]]]:
    """(offset, label) of every ``tile``-sided window holding a scored pixel, row by row."""
    out = []
    for r in range(0, mask.shape[0], tile):
        for c in range(0, mask.shape[1], tile):
            window = mask[r : r + tile, c : c + tile]
            if (window != IGNORE_INDEX).any():
                out.append(((r, c), multi_hot(window, num_classes)))
    return out


def samples(ds: torch.utils.data.Dataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def assert_tiles(ds: torch.utils.data.Dataset, masks: dict[str, np.ndarray], tile: int, n: int) -> None:
    got = [(s["meta"]["parent"], s["meta"]["offset"], s["label"].tolist()) for s in samples(ds)]
    want = [(i, off, lab) for i in sorted(masks) for off, lab in expected_tiles(masks[i], tile, n)]
    assert got == want


def assert_same(a: dict, b: dict) -> None:
    assert a["id"] == b["id"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert torch.equal(a["label"], b["label"])


# ---------------------------------------------------------------------------------------------
# how torchgeo's ids relate to the project's


def test_torchgeo_ids_follow_torchgeo_colormaps_and_classes():
    ids = torchgeo_layouts.TORCHGEO_IDS
    for name, cls, space in (
        ("torchgeo-deepglobe", torchgeo_datasets.DeepGlobeLandCover, deepglobe.LABEL_SPACE),
        ("torchgeo-potsdam", torchgeo_datasets.Potsdam2D, isprs.LABEL_SPACE),
        ("torchgeo-vaihingen", torchgeo_datasets.Vaihingen2D, isprs.LABEL_SPACE),
    ):
        assert sorted(ids[name]) == list(range(len(cls.colormap)))
        for theirs, ours in ids[name].items():
            colour = space.ignore_color if ours == IGNORE_INDEX else space.palette[ours]
            assert tuple(cls.colormap[theirs]) == tuple(colour), (name, theirs)
    # LoveDA: stored 0 is no-data, stored k is torchgeo's classes[k - 1].
    classes = torchgeo_datasets.LoveDA.classes
    assert classes[-1] == "no-data" and ids["torchgeo-loveda"][0] == IGNORE_INDEX
    for stored in range(1, 8):
        assert loveda.CLASSES[ids["torchgeo-loveda"][stored]] == classes[stored - 1]


def test_loaders_are_registered_and_torchgeo_is_imported_lazily():
    domain = RemoteSensingDomain()
    for name, splits in (
        ("torchgeo-deepglobe", ("train", "test")),
        ("torchgeo-loveda", ("train", "val", "test")),
        ("torchgeo-potsdam", ("train", "test")),
        ("torchgeo-vaihingen", ("train", "test")),
    ):
        spec = domain.dataset(name)
        assert spec.splits == splits and spec.default_split == "train" and spec.native_slices
    assert domain.dataset("torchgeo-loveda").label_space == loveda.LABEL_SPACE
    probe = (
        "import sys, wsss_adapters.remote_sensing as rs; rs.RemoteSensingDomain().datasets();"
        " print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchgeo'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# DeepGlobe

DG_COLOURS = [*deepglobe.PALETTE, deepglobe.UNKNOWN]  # painted id 6 = unknown
DG_DAMAGED = (250, 6, 247)  # a JPEG-damaged rangeland pixel, as the real masks hold


def _deepglobe_masks() -> dict[str, dict[str, np.ndarray]]:
    return {
        "train": {"1": quadrants((0, 1, 6, 5)), "2": quadrants((2, 3, 4, 4))},
        "test": {"3": quadrants((5, 6, 6, 0))},
    }


def _write_deepglobe(root: Path, layout: str) -> dict[str, np.ndarray]:
    """torchgeo's layout (``data/training_data``) or the project's (``train``); expected ids."""
    expected = {}
    for split, masks in _deepglobe_masks().items():
        for sample_id, ids in masks.items():
            rgb = paint(ids, DG_COLOURS)
            rgb[1, 1] = DG_DAMAGED
            if layout == "torchgeo":
                folder = root / "data" / ("training_data" if split == "train" else "test_data")
                image, mask = (
                    folder / "images" / f"{sample_id}_sat.jpg",
                    folder / "masks" / f"{sample_id}_mask.png",
                )
            else:
                image, mask = root / split / f"{sample_id}_sat.jpg", root / split / f"{sample_id}_mask.png"
            write_jpg(image, photo(32, 32, int(sample_id)))
            write_png(mask, rgb)
            want = np.where(ids == 6, IGNORE_INDEX, ids)
            want[1, 1] = 2
            expected[sample_id] = want
    return expected


def test_deepglobe_torchgeo_layout_samples_splits_tiles(tmp_path):
    root = tmp_path / "tg"
    expected = _write_deepglobe(root, "torchgeo")
    spec = RemoteSensingDomain().dataset("torchgeo-deepglobe")
    train, test = spec.build(root, "train"), spec.build(root, "test")
    assert [s["id"] for s in samples(train)] == ["1", "2"] and [s["id"] for s in samples(test)] == ["3"]
    for s in [*samples(train), *samples(test)]:
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
        assert 0.0 <= float(s["image"].min()) <= float(s["image"].max()) <= 1.0
        assert torch.equal(s["mask"], torch.from_numpy(expected[s["id"]]))
        assert s["label"].tolist() == multi_hot(expected[s["id"]], 6)
    assert [s["id"] for s in samples(spec.build(root, "train[1:]"))] == ["2"]
    tiles = spec.build(root, "train", labels_from_masks=True, patch_size=16)
    assert_tiles(tiles, {k: expected[k] for k in ("1", "2")}, 16, 6)  # the unknown quadrant's tile dropped
    with pytest.raises(ValueError, match="no split 'valid'"):
        spec.build(root, "valid")


def test_deepglobe_torchgeo_layout_matches_the_deepglobe_loader_and_torchgeo(tmp_path):
    tg, ours = tmp_path / "tg", tmp_path / "ours"
    _write_deepglobe(tg, "torchgeo")
    _write_deepglobe(ours, "project")
    spec = RemoteSensingDomain().dataset("torchgeo-deepglobe")
    mine = samples(spec.build(tg, "train")) + samples(spec.build(tg, "test"))
    reference = samples(deepglobe.build(ours, "train")) + samples(deepglobe.build(ours, "test"))
    assert len(mine) == len(reference) == 3
    for a, b in zip(mine, reference, strict=True):
        assert_same(a, b)
    # torchgeo's own reading, its ids mapped: the same but for the damaged pixel it calls urban.
    table = torchgeo_layouts.TORCHGEO_IDS["torchgeo-deepglobe"]
    theirs = torchgeo_datasets.DeepGlobeLandCover(root=str(tg), split="train", checksum=False)
    for i, s in enumerate(mine[:2]):
        sample = theirs[i]
        mapped = sample["mask"].clone().apply_(lambda v: table[v])
        assert int(sample["mask"][1, 1]) == 0 and int(s["mask"][1, 1]) == 2
        mapped[1, 1] = 2
        assert torch.equal(mapped, s["mask"])
        # Same pixels up to the JPEG decoder: PIL's (torchgeo) and GDAL's (here) upsample chroma apart.
        assert sample["image"].shape == s["image"].shape


def test_deepglobe_detection_does_not_steal_and_errors_are_clear(tmp_path):
    domain = RemoteSensingDomain()
    tg, ours = tmp_path / "tg", tmp_path / "ours"
    _write_deepglobe(tg, "torchgeo")
    _write_deepglobe(ours, "project")
    assert domain.detect_dataset(tg).name == "torchgeo-deepglobe"
    assert domain.detect_dataset(ours).name == "deepglobe"
    spec = domain.dataset("torchgeo-deepglobe")
    with pytest.raises(DataError, match=r"pass its parent"):
        spec.build(tg / "data", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError) as info:
        spec.build(empty, "train")
    message = str(info.value)
    assert message.startswith(str(empty)) and "data/training_data/images/ is missing" in message
    assert "torchgeo expects data/training_data/images/<id>_sat.jpg" in message and "unpack" in message
    assert sorted(p.name for p in empty.iterdir()) == ["data.zip"]  # nothing unpacked, nothing fetched
    with pytest.raises(DataError, match="data/training_data/images/ is missing"):
        spec.build(ours, "train")  # the deepglobe loader's layout is not torchgeo's
    with pytest.raises(DataError, match="is not a folder"):
        spec.build(tmp_path / "nowhere", "train")
    (tg / "data" / "test_data" / "masks" / "3_mask.png").unlink()
    with pytest.raises(DataError, match=r"3_sat\.jpg: has no mask"):
        spec.build(tg, "test")


# ---------------------------------------------------------------------------------------------
# LoveDA


def _write_loveda(root: Path) -> dict[str, np.ndarray]:
    """``Val/{Urban,Rural}`` with masks, ``Test/{Urban,Rural}`` without; expected ids of Val."""
    stored = {("Urban", "1366"): quadrants((0, 1, 2, 7)), ("Rural", "2522"): quadrants((3, 4, 5, 6))}
    expected = {}
    for (scene, stem), ids in stored.items():
        write_png(root / "Val" / scene / "images_png" / f"{stem}.png", photo(32, 32, int(stem)))
        write_png(root / "Val" / scene / "masks_png" / f"{stem}.png", ids)
        expected[stem] = np.where(ids == 0, IGNORE_INDEX, ids - 1)
    for scene, stem in (("Urban", "4191"), ("Rural", "5167")):
        write_png(root / "Test" / scene / "images_png" / f"{stem}.png", photo(32, 32, int(stem)))
    return expected


def test_loveda_torchgeo_layout_samples_scenes_and_tiles(tmp_path):
    root = tmp_path / "loveda"
    expected = _write_loveda(root)
    spec = RemoteSensingDomain().dataset("torchgeo-loveda")
    val = samples(spec.build(root, "val"))
    assert [(s["id"], s["meta"]["scene"]) for s in val] == [("1366", "urban"), ("2522", "rural")]
    for s in val:
        written = np.array(Image.open(s["meta"]["path"]))
        assert torch.equal(s["image"], torch.from_numpy(written).permute(2, 0, 1).float() / 255)
        assert torch.equal(s["mask"], torch.from_numpy(expected[s["id"]]))
        assert s["label"].tolist() == multi_hot(expected[s["id"]], 7)
    rural = samples(spec.build(root, "val", scene="rural"))
    assert [s["id"] for s in rural] == ["2522"]
    assert len(spec.build(root, "val", scene=["urban", "rural"])) == 2
    test = samples(spec.build(root, "test"))
    assert [s["id"] for s in test] == ["4191", "5167"] and all("mask" not in s for s in test)
    assert_tiles(spec.build(root, "val", labels_from_masks=True, patch_size=16), expected, 16, 7)
    with pytest.raises(ValueError, match="scene must be"):
        spec.build(root, "val", scene="suburban")


def test_loveda_torchgeo_layout_matches_the_loveda_loader_and_torchgeo(tmp_path):
    root, converted = tmp_path / "loveda", tmp_path / "mmseg"
    _write_loveda(root)
    for folder in (root / "Val").glob("*/images_png/*.png"):
        write_png(converted / "img_dir" / "val" / folder.name, np.asarray(Image.open(folder)))
        write_png(
            converted / "ann_dir" / "val" / folder.name,
            np.asarray(Image.open(folder.parent.parent / "masks_png" / folder.name)),
        )
    mine = sorted(
        samples(RemoteSensingDomain().dataset("torchgeo-loveda").build(root, "val")), key=lambda s: s["id"]
    )
    for reference in (loveda.build(root, "val"), loveda.build(converted, "val")):
        ref = sorted(samples(reference), key=lambda s: s["id"])
        assert len(ref) == len(mine) == 2
        for a, b in zip(mine, ref, strict=True):
            assert_same(a, b)
    table = torchgeo_layouts.TORCHGEO_IDS["torchgeo-loveda"]
    theirs = torchgeo_datasets.LoveDA(root=str(root), split="val", download=False, checksum=False)
    by_id = {Path(f["image"]).stem: i for i, f in enumerate(theirs.files)}
    for s in mine:
        sample = theirs[by_id[s["id"]]]
        assert torch.equal(sample["mask"].clone().apply_(lambda v: table[v]), s["mask"])
        assert torch.equal(sample["image"] / 255, s["image"])


def test_loveda_torchgeo_layout_detection_and_errors(tmp_path):
    domain = RemoteSensingDomain()
    root = tmp_path / "loveda"
    _write_loveda(root)
    assert domain.detect_dataset(root).name == "loveda"  # the official layout: loveda's, not ambiguous
    spec = domain.dataset("torchgeo-loveda")
    with pytest.raises(DataError) as info:
        spec.build(root, "train")
    assert str(info.value).startswith(str(root)) and "Train/Urban/ is missing" in str(info.value)
    assert "torchgeo expects {Train,Val,Test}/{Urban,Rural}/images_png/<n>.png" in str(info.value)
    (root / "Val.zip").write_bytes(b"PK")
    shutil.rmtree(root / "Val" / "Rural")
    with pytest.raises(DataError, match=r"Val/Rural/ is missing.*Val\.zip is here: unpack it"):
        spec.build(root, "val")
    assert [s["id"] for s in samples(spec.build(root, "val", scene="urban"))] == ["1366"]
    (root / "Val" / "Urban" / "masks_png" / "1366.png").unlink()
    with pytest.raises(DataError, match=r"1366\.png: has no mask"):
        spec.build(root, "val", scene="urban")


# ---------------------------------------------------------------------------------------------
# ISPRS Potsdam and Vaihingen

ISPRS_COLOURS = [*isprs.PALETTE, isprs.BOUNDARY]  # painted id 6 = black
POTSDAM_LABELS = {
    "2_10": ("train", (0, 1, 5, 3)),
    "2_11": ("train", (4, 4, 2, 5)),
    "5_15": ("test", (1, 0, 0, 2)),
}
VAIHINGEN_LABELS = {
    "area1": ("train", (0, 1, 5, 3)),
    "area3": ("train", (4, 4, 2, 5)),
    "area6": ("test", (1, 0, 0, 2)),
}


def _write_isprs(root: Path, dataset: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """torchgeo's Potsdam or Vaihingen layout; (images ``C x H x W``, expected ids) by sample id."""
    labels = POTSDAM_LABELS if dataset == "potsdam" else VAIHINGEN_LABELS
    images, expected = {}, {}
    for k, (sample_id, (_, quads)) in enumerate(labels.items()):
        ids = quadrants(quads)
        ids[2, 3] = 6  # one black (boundary) pixel
        if dataset == "potsdam":
            image = np.moveaxis(photo(32, 32, k, channels=4), -1, 0)
            image[3] = np.maximum(image[3], 1)  # GDAL tags a fourth uint8 band alpha: 0 would be no-data
            write_tif(root / "4_Ortho_RGBIR" / f"top_potsdam_{sample_id}_RGBIR.tif", image)
            write_tif(
                root / f"top_potsdam_{sample_id}_label.tif", np.moveaxis(paint(ids, ISPRS_COLOURS), -1, 0)
            )
        else:
            image = np.moveaxis(photo(32, 32, k), -1, 0)
            write_tif(root / "top" / f"top_mosaic_09cm_{sample_id}.tif", image)
            write_tif(
                root / f"top_mosaic_09cm_{sample_id}.tif", np.moveaxis(paint(ids, ISPRS_COLOURS), -1, 0)
            )
        images[sample_id] = image
        expected[sample_id] = np.where(ids == 6, IGNORE_INDEX, ids)
    unlabelled = "6_15" if dataset == "potsdam" else "area24"  # an image torchgeo skips: no label
    if dataset == "potsdam":
        write_tif(root / "4_Ortho_RGBIR" / f"top_potsdam_{unlabelled}_RGBIR.tif", np.zeros((4, 32, 32)))
    else:
        write_tif(root / "top" / f"top_mosaic_09cm_{unlabelled}.tif", np.zeros((3, 32, 32)))
    return images, expected


@pytest.mark.parametrize("dataset", ["potsdam", "vaihingen"])
def test_isprs_torchgeo_layout_samples_splits_and_tiles(tmp_path, dataset):
    images, expected = _write_isprs(tmp_path, dataset)
    labels = POTSDAM_LABELS if dataset == "potsdam" else VAIHINGEN_LABELS
    spec = RemoteSensingDomain().dataset(f"torchgeo-{dataset}")
    for split in ("train", "test"):
        ds = samples(spec.build(tmp_path, split))
        assert [s["id"] for s in ds] == sorted(i for i, (sp, _) in labels.items() if sp == split)
        for s in ds:
            want = torch.from_numpy(images[s["id"]][:3].astype(np.float32) / 255)
            assert s["image"].shape == (3, 32, 32) and torch.equal(s["image"], want)
            assert torch.equal(s["mask"], torch.from_numpy(expected[s["id"]]))
            assert s["label"].tolist() == multi_hot(expected[s["id"]], 6)
            assert s["meta"]["split"] == split
    train_ids = [i for i, (sp, _) in labels.items() if sp == "train"]
    tiles = spec.build(tmp_path, "train", labels_from_masks=True, patch_size=16)
    assert_tiles(tiles, {i: expected[i] for i in train_ids}, 16, 6)
    if dataset == "potsdam":  # four bands: IR-R-G on request
        s = spec.build(tmp_path, "train", bands=(4, 1, 2))[0]
        assert torch.equal(s["image"], torch.from_numpy(images[s["id"]][[3, 0, 1]].astype(np.float32) / 255))
    with pytest.raises(ValueError, match="no split 'val'"):
        spec.build(tmp_path, "val")


@pytest.mark.parametrize("dataset", ["potsdam", "vaihingen"])
def test_isprs_torchgeo_layout_matches_the_isprs_loader_and_torchgeo(tmp_path, dataset):
    _write_isprs(tmp_path, dataset)
    domain = RemoteSensingDomain()
    assert (
        domain.detect_dataset(tmp_path).name == dataset
    )  # the official files: isprs's loader, not ambiguous
    spec = domain.dataset(f"torchgeo-{dataset}")
    for split, official in (("train", "train"), ("test", "val")):
        mine = samples(spec.build(tmp_path, split))
        ref = [s for s in samples(domain.dataset(dataset).build(tmp_path, official)) if "mask" in s]
        assert len(mine) == len(ref) > 0
        for a, b in zip(mine, ref, strict=True):
            assert_same(a, b)
    # torchgeo's own reading: clutter is its 0 (ours 5); the black pixel it calls clutter, we ignore.
    table = torchgeo_layouts.TORCHGEO_IDS[f"torchgeo-{dataset}"]
    cls = torchgeo_datasets.Potsdam2D if dataset == "potsdam" else torchgeo_datasets.Vaihingen2D
    theirs = cls(root=str(tmp_path), split="train", checksum=False)
    mine = samples(spec.build(tmp_path, "train"))
    by_path = {str(Path(f["image"])): i for i, f in enumerate(theirs.files)}
    assert len(theirs) == len(mine)
    for s in mine:
        sample = theirs[by_path[s["meta"]["path"]]]
        mapped = sample["mask"].clone().apply_(lambda v: table[v])
        assert int(mapped[2, 3]) == isprs.CLASSES.index("clutter") and int(s["mask"][2, 3]) == IGNORE_INDEX
        mapped[2, 3] = IGNORE_INDEX
        assert torch.equal(mapped, s["mask"])
        assert torch.equal(sample["image"][:3] / 255, s["image"])


@pytest.mark.parametrize("dataset", ["potsdam", "vaihingen"])
def test_isprs_torchgeo_layout_errors_are_clear(tmp_path, dataset):
    spec = RemoteSensingDomain().dataset(f"torchgeo-{dataset}")
    folder, zips = (
        ("4_Ortho_RGBIR", "4_Ortho_RGBIR.zip, 5_Labels_all.zip")
        if dataset == "potsdam"
        else (
            "top",
            "ISPRS_semantic_labeling_Vaihingen.zip, ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip",
        )
    )
    with pytest.raises(DataError) as info:
        spec.build(tmp_path, "train")
    assert str(info.value).startswith(str(tmp_path)) and f"{folder}/ is missing; torchgeo expects" in str(
        info.value
    )
    assert "is here" not in str(info.value) and "are here" not in str(info.value)  # no archive yet
    for name in zips.split(", "):
        (tmp_path / name).write_bytes(b"PK")
    with pytest.raises(DataError, match=f"{zips} are here: unpack them"):
        spec.build(tmp_path, "train")
    assert not (tmp_path / folder).exists()  # torchgeo never got to unpack them
    _write_isprs(tmp_path, dataset)
    for label in tmp_path.glob("top_*.tif"):
        label.unlink()  # images without labels: torchgeo lists none
    with pytest.raises(DataError, match=f"torchgeo {spec.name[9:].capitalize()}2D finds no 'train' image"):
        spec.build(tmp_path, "train")
