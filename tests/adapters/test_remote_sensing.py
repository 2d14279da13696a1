"""The remote-sensing plugin: windowed rasters, every loader on a tiny copy of its real layout, hooks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from wsss_adapters.remote_sensing import (
    RasterTiles,
    RemoteSensingDomain,
    deepglobe,
    dubai,
    isaid,
    isprs,
    iter_windows,
    loveda,
)
from wsss_adapters.remote_sensing.augment import flip_rotate
from wsss_adapters.remote_sensing.metrics import cohen_kappa, overall_accuracy
from wsss_adapters.remote_sensing.prompts import clip_prompts_for

from wsss_domains.clip import prompt_files
from wsss_domains.data import raster_reader as raster
from wsss_domains.data.io import DataError
from wsss_domains.data.patches import PatchDataset
from wsss_domains.data.splits import parse_split
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace, ListsSampleIds, PromptKind
from wsss_domains.domains.registry import create_domain

# ---------------------------------------------------------------------------------------------
# writing tiny rasters


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_palette_png(path: Path, index: np.ndarray, colours: list[tuple[int, int, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(index.astype(np.uint8), mode="P")
    image.putpalette([v for c in colours for v in c])
    image.save(path)
    return path


def write_jpg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=95)
    return path


def write_tif(path: Path, bands: np.ndarray, nodata: float | None = None) -> Path:
    """A georeferenced GeoTIFF from a ``C x H x W`` array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = bands.shape
    profile = dict(
        driver="GTiff",
        height=height,
        width=width,
        count=count,
        dtype=bands.dtype.name,
        crs="EPSG:32633",
        transform=rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5800000.0),
        nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(bands))
    return path


def paint(ids: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Colour an id map with ``colours[id]``."""
    return np.array(colours, dtype=np.uint8)[ids]


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def quadrants(h: int, w: int, ids: tuple[int, int, int, int]) -> np.ndarray:
    """An id map whose four quadrants hold ``ids`` (top-left, top-right, bottom-left, bottom-right)."""
    out = np.empty((h, w), dtype=np.int64)
    out[: h // 2, : w // 2], out[: h // 2, w // 2 :] = ids[0], ids[1]
    out[h // 2 :, : w // 2], out[h // 2 :, w // 2 :] = ids[2], ids[3]
    return out


# ---------------------------------------------------------------------------------------------
# windows and windowed reading


def test_iter_windows_cover_the_raster_and_stay_inside():
    windows = list(iter_windows(70, 50, tile=32, overlap=8))
    cover = np.zeros((70, 50), dtype=int)
    for w in windows:
        assert w.row + w.height <= 70 and w.col + w.width <= 50
        assert (w.height, w.width) == (32, 32)
        cover[w.row : w.row + w.height, w.col : w.col + w.width] += 1
    assert cover.min() >= 1
    assert sorted({w.row for w in windows}) == [0, 24, 38]  # stride 24, last aligned to the edge
    assert sorted({w.col for w in windows}) == [0, 18]
    assert list(iter_windows(10, 12, tile=32)) == [(0, 0, 10, 12)]  # smaller than a tile: one window
    with pytest.raises(ValueError, match="overlap"):
        list(iter_windows(10, 10, tile=8, overlap=8))


def test_raster_tiles_read_window_by_window_and_stitch_back(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    full = rng.integers(1, 256, (3, 90, 70), dtype=np.uint8)
    full[:, 60:, :10] = 0  # a no-data corner
    path = write_tif(tmp_path / "scene.tif", full, nodata=0)
    reads: list[tuple[str, object, tuple[int, ...]]] = []
    for method in ("read", "read_masks"):
        original = getattr(rasterio.io.DatasetReader, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            out = _original(self, *args, **kwargs)
            reads.append((_method, kwargs.get("window"), out.shape))
            return out

        monkeypatch.setattr(rasterio.io.DatasetReader, method, spy)
    tiles = RasterTiles(path, tile=32, overlap=4)
    assert reads == []  # building the index reads headers only
    stitched, excluded = torch.zeros(3, 90, 70), torch.zeros(90, 70, dtype=torch.bool)
    for i in range(len(tiles)):
        s = tiles[i]
        r, c, h, w = s["meta"]["window"]
        assert s["meta"]["full_size"] == (90, 70) and s["id"] == f"scene@{r},{c}"
        stitched[:, r : r + h, c : c + w] = s["image"]
        excluded[r : r + h, c : c + w] = s["exclude"]
    assert len(tiles) == len(list(iter_windows(90, 70, 32, 4)))
    assert torch.allclose(stitched, torch.from_numpy(full).float() / 255)
    assert torch.equal(excluded, torch.from_numpy((full == 0).all(0)))
    assert {m for m, _, _ in reads} == {"read", "read_masks"}
    assert all(window is not None for _, window, _ in reads)
    assert max(math.prod(shape[-2:]) for _, _, shape in reads) <= 32 * 32


def test_tile_index_scans_masks_in_strips_not_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(raster, "WHOLE_DECODE_PIXELS", 0)  # PNG read window by window, like a big one
    ids = quadrants(96, 64, (1, 2, 3, 4))
    ids[:32, :] = 0  # a no-data band: tiles in it are dropped
    root = tmp_path / "loveda"
    write_png(root / "img_dir" / "train" / "7.png", photo(96, 64))
    write_png(root / "ann_dir" / "train" / "7.png", ids)
    shapes: list[tuple[int, ...]] = []
    original = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        assert kwargs.get("window") is not None
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    tiles = loveda.build(root, "train", labels_from_masks=True, patch_size=32)
    assert shapes and max(s[-2] for s in shapes) <= 32  # strips at most one tile high
    assert [tiles[i]["meta"]["offset"] for i in range(len(tiles))] == [
        (r, c) for r in (32, 64) for c in (0, 32)
    ]
    assert isinstance(tiles, ListsSampleIds)  # a split of tiles is sliced without reading them
    assert tiles.sample_ids() == [tiles[i]["id"] for i in range(len(tiles))]


def test_small_png_and_jpeg_are_decoded_once_for_all_their_tiles(tmp_path, monkeypatch):
    root = tmp_path / "loveda"
    write_jpg(root / "img_dir" / "train" / "3.jpg", photo(64, 64))  # not a LoveDA name: ignored
    write_png(root / "img_dir" / "train" / "3.png", photo(64, 64))
    write_png(root / "ann_dir" / "train" / "3.png", quadrants(64, 64, (1, 2, 3, 4)))
    reads: list[object] = []
    original = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        reads.append(kwargs.get("window"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    tiles = loveda.build(root, "train", labels_from_masks=True, patch_size=16)
    samples = [tiles[i] for i in range(len(tiles))]
    assert len(samples) == 16 and reads == [None, None]  # one whole decode each of mask and image
    mosaic = torch.zeros(64, 64, dtype=torch.long)
    for s in samples:
        r, c = s["meta"]["offset"]
        mosaic[r : r + 16, c : c + 16] = s["mask"]
    assert torch.equal(mosaic, torch.from_numpy(quadrants(64, 64, (0, 1, 2, 3))))
    write_png(root / "ann_dir" / "train" / "3.png", quadrants(64, 64, (4, 4, 4, 4)))  # rewritten
    assert set(loveda.build(root, "train")[0]["mask"].unique().tolist()) == {3}


def test_geotiff_band_selection_nodata_and_scaling(tmp_path):
    h, w, nodata = 40, 48, 9999
    bands = np.stack([np.full((h, w), 10 * (k + 1), dtype=np.uint16) for k in range(4)])
    bands[:, :, :] += np.arange(w, dtype=np.uint16)[None, None, :] * 100
    bands[:, :8, :] = nodata  # no-data rows: every band holds the nodata value
    bands[1, 20, 5] = nodata  # one selected band at the nodata value is still a valid pixel
    path = write_tif(tmp_path / "ms.tif", bands, nodata=nodata)
    tiles = RasterTiles(path, tile=64, bands=(4, 1, 2), scaling="dtype")
    s = tiles[0]
    assert s["image"].shape == (3, h, w)
    assert torch.equal(s["exclude"][:8], torch.ones(8, w, dtype=torch.bool))
    assert not s["exclude"][8:].any()
    expected = torch.from_numpy(bands[[3, 0, 1], 10].astype(np.float32) / 65535)
    assert torch.allclose(s["image"][:, 10], expected)
    assert float(s["image"][:, :8].abs().max()) == 0.0  # no-data reads as 0, not 9999/65535
    stretched = RasterTiles(path, tile=64, bands=(4, 1, 2))[0]["image"]  # uint16: percentile stretch
    assert float(stretched[:, 8:].min()) == 0.0 and float(stretched[:, 8:].max()) == 1.0
    row = stretched[0, 20]
    assert bool((row[1:] >= row[:-1]).all())  # a monotone stretch keeps the ramp's order
    assert float(row[w // 2]) == pytest.approx(0.5, abs=0.05)  # the nodata value is no outlier
    assert float(stretched[:, :8].abs().max()) == 0.0
    with pytest.raises(DataError, match="asks for band 5"):
        RasterTiles(path, tile=64, bands=(5, 1, 2))


def test_raster_tiles_mask_raster_with_nodata(tmp_path):
    space = LabelSpace(("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    ids = quadrants(40, 40, (0, 1, 2, 1)).astype(np.uint8)
    ids[:5, :5] = 200  # the mask raster's nodata value, no class id
    image = write_tif(
        tmp_path / "img.tif", np.random.default_rng(3).integers(0, 256, (3, 40, 40), dtype=np.uint8)
    )
    mask = write_tif(tmp_path / "mask.tif", ids[None], nodata=200)
    tiles = RasterTiles(image, mask, tile=20, label_space=space)
    first = tiles[0]
    assert first["label"].tolist() == [1, 0, 0] and "exclude" not in first
    expected = torch.zeros(20, 20, dtype=torch.long)
    expected[:5, :5] = IGNORE_INDEX
    assert torch.equal(first["mask"], expected)
    assert [tiles[i]["label"].tolist() for i in range(1, 4)] == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="label_space"):
        RasterTiles(image, mask, tile=20)


def test_potsdam_official_rgbir_nodata_and_eroded_labels(tmp_path):
    h, w = 48, 40
    ids = quadrants(h, w, (0, 1, 3, 4))
    eroded = ids.copy()
    eroded[h // 2 - 1 : h // 2 + 1, :] = 6  # boundary band painted black
    colours = [*isprs.PALETTE, (0, 0, 0)]
    rgbir = np.random.default_rng(2).integers(1, 256, (4, h, w), dtype=np.uint8)
    rgbir[:, :, :4] = 0  # no-data columns
    write_tif(tmp_path / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif", rgbir, nodata=0)
    write_tif(
        tmp_path / "5_Labels_all" / "top_potsdam_2_10_label.tif", np.moveaxis(paint(ids, colours), -1, 0)
    )
    write_tif(
        tmp_path / "5_Labels_all_noBoundary" / "top_potsdam_2_10_label_noBoundary.tif",
        np.moveaxis(paint(eroded, colours), -1, 0),
    )
    write_tif(tmp_path / "4_Ortho_RGBIR" / "top_potsdam_2_13_RGBIR.tif", rgbir)  # a val area
    assert RemoteSensingDomain().detect_dataset(tmp_path).name == "potsdam"
    ds = isprs.POTSDAM.build(tmp_path, "train", bands=(4, 1, 2))
    assert len(ds) == 1
    s = ds[0]
    assert s["id"] == "2_10"
    assert torch.allclose(s["image"][:, 30, 20], torch.from_numpy(rgbir[[3, 0, 1], 30, 20] / 255).float())
    assert bool(s["exclude"][:, :4].all()) and not s["exclude"][:, 4:].any()
    expected = torch.from_numpy(np.where(eroded == 6, IGNORE_INDEX, ids))
    expected[:, :4] = IGNORE_INDEX
    assert torch.equal(s["mask"], expected)
    assert s["label"].tolist() == [1, 1, 0, 1, 1, 0]
    full = isprs.POTSDAM.build(tmp_path, "train", eroded=False)[0]["mask"]
    assert int((full == IGNORE_INDEX).sum()) == 4 * h  # only the no-data columns
    val = isprs.POTSDAM.build(tmp_path, "val")
    assert len(val) == 1 and "label" not in val[0] and "mask" not in val[0]


# ---------------------------------------------------------------------------------------------
# DeepGlobe


def _deepglobe(root: Path, n: int = 4) -> Path:
    colours = list(deepglobe.PALETTE) + [deepglobe.UNKNOWN]
    for k in range(n):
        ids = quadrants(32, 32, (k % 6, (k + 1) % 6, 6, 5))
        rgb = paint(ids, colours)
        rgb[0, 0] = (250, 6, 247)  # JPEG-damaged rangeland
        write_jpg(root / "train" / f"{100 + k}_sat.jpg", photo(32, 32, k))
        write_png(root / "train" / f"{100 + k}_mask.png", rgb)
    write_jpg(root / "valid" / "900_sat.jpg", photo(32, 32, 9))
    return root


def test_deepglobe_stratified_folds_split_each_class_between_folds(tmp_path):
    colours = list(deepglobe.PALETTE)
    # Classes per scene (urban 0, rangeland 2, forest 3, water 4): interleaved folds would put both
    # forest scenes (100, 102) in fold 1 and both water scenes (102, 103) together.
    quarters = {100: (3, 3, 0, 0), 101: (0, 0, 0, 2), 102: (3, 4, 4, 4), 103: (4, 2, 2, 2)}
    for k, q in quarters.items():
        write_jpg(tmp_path / "train" / f"{k}_sat.jpg", photo(32, 32, k))
        write_png(tmp_path / "train" / f"{k}_mask.png", paint(quadrants(32, 32, q), colours))
    ids = lambda ds: [ds[i]["id"] for i in range(len(ds))]  # noqa: E731
    assert ids(deepglobe.build(tmp_path, "train[fold=1/2]")) == ["100", "102"]
    # By hand (iterative stratification): urban first (tie on class 0, then order): 100 -> fold 1,
    # 101 -> fold 2; rangeland's 103 -> fold 1 (fold 2 has 101); forest's 102 -> fold 2.
    assert ids(deepglobe.build(tmp_path, "train[fold=1/2, stratified]")) == ["100", "103"]
    tiles = deepglobe.build(tmp_path, "train[fold!=1/2, stratified]", labels_from_masks=True, patch_size=16)
    assert sorted({tiles[i]["meta"]["parent"] for i in range(len(tiles))}) == ["101", "102"]


def test_deepglobe_colours_threshold_unknown_ignored_and_holdout(tmp_path):
    root = _deepglobe(tmp_path / "dg")
    domain = RemoteSensingDomain()
    assert domain.detect_dataset(root).name == "deepglobe"
    ds = deepglobe.build(root, "train")
    assert [ds[i]["id"] for i in range(len(ds))] == ["100", "101", "102", "103"]
    s = ds[1]
    assert (
        s["image"].shape == (3, 32, 32) and 0.0 <= float(s["image"].min()) <= float(s["image"].max()) <= 1.0
    )
    expected = torch.from_numpy(quadrants(32, 32, (1, 2, IGNORE_INDEX, 5)))
    expected[0, 0] = 2
    assert torch.equal(s["mask"], expected)
    assert s["label"].tolist() == [0, 1, 1, 0, 0, 1]
    assert deepglobe.LABEL_SPACE.background_mode is BackgroundMode.NONE
    first, rest = deepglobe.build(root, "train[0:3]"), deepglobe.build(root, "train[3:]")
    assert [first[i]["id"] for i in range(3)] + [rest[0]["id"]] == ["100", "101", "102", "103"]
    assert len(deepglobe.build(root, "train[:50%]")) == 2 and len(deepglobe.build(root, "TRAIN[-1:]")) == 1
    tiles = deepglobe.build(root, "train[3:]", labels_from_masks=True, patch_size=16)
    assert [tiles[i]["label"].tolist() for i in range(len(tiles))] == [
        [0, 0, 1, 1, 0, 0],  # forest, and the JPEG-damaged rangeland pixel
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],  # the unknown (ignore) quadrant's tile is dropped
    ]
    valid = deepglobe.build(root, "valid")
    assert len(valid) == 1 and "label" not in valid[0] and "mask" not in valid[0]
    with pytest.raises(DataError, match="needs masks"):
        deepglobe.build(root, "valid", labels_from_masks=True)


def test_windowed_tiles_match_patches_cut_from_whole_images(tmp_path):
    root = _deepglobe(tmp_path / "dg", n=2)
    whole = deepglobe.build(root, "train", patch_size=8)  # patch_size alone cuts nothing
    assert len(whole) == 2 and whole[0]["image"].shape == (3, 32, 32)
    for size, min_fraction in ((16, 0.0), ((16, 8), 0.0), ((8, 16), 0.2)):
        ours = deepglobe.build(
            root, "train", labels_from_masks=True, patch_size=size, min_fraction=min_fraction
        )
        reference = PatchDataset(whole, deepglobe.LABEL_SPACE, size, min_fraction=min_fraction)
        assert len(ours) == len(reference) > 0
        for i in range(len(ours)):
            a, b = ours[i], reference[i]
            assert a["id"] == b["id"] and a["meta"]["offset"] == b["meta"]["offset"]
            assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["label"], b["label"])
            assert torch.allclose(a["image"], b["image"])


def test_deepglobe_errors_name_the_file(tmp_path):
    root = _deepglobe(tmp_path / "dg", n=1)
    bad = paint(np.zeros((32, 32), dtype=int), [(255, 0, 0)])  # red is no DeepGlobe class
    write_png(root / "train" / "100_mask.png", bad)
    with pytest.raises(DataError, match=r"100_mask\.png.*colour \(255, 0, 0\)"):
        deepglobe.build(root, "train")[0]
    with pytest.raises(DataError, match=r"100_mask\.png.*colour"):
        deepglobe.build(root, "train", labels_from_masks=True)  # caught while indexing tiles
    write_png(root / "train" / "100_mask.png", paint(np.zeros((30, 32), dtype=int), [(0, 255, 0)]))
    with pytest.raises(DataError, match=r"100_mask\.png.*does not match image size"):
        deepglobe.build(root, "train")[0]
    (root / "train" / "100_sat.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"100_sat\.jpg.*unreadable"):
        deepglobe.build(root, "train")[0]
    with pytest.raises(DataError, match="holds no images"):
        deepglobe.build(root, "test")
    with pytest.raises(DataError, match="holds no images"):
        deepglobe.build(root, "train[5:]")
    with pytest.raises(ValueError, match="no split 'training'"):
        deepglobe.build(root, "training")


def test_split_syntax():
    assert parse_split("train[0:6]") == parse_split(" train [0:6] ")
    request = parse_split("Tile 1,Tile 2[80%:]")
    assert request.base == "Tile 1,Tile 2" and request.sliced
    assert not parse_split("valid").sliced
    for bad in ("train[a:b]", "train[0:6", "train[120%:]", "[0:3]", "train[1.5:]"):
        with pytest.raises(ValueError):
            parse_split(bad)


# ---------------------------------------------------------------------------------------------
# LoveDA


def _loveda_masks() -> dict[str, np.ndarray]:
    a = quadrants(32, 32, (0, 1, 2, 7))  # 0 = no-data
    b = quadrants(32, 32, (3, 4, 5, 6))
    return {"11": a, "2600": b}


def test_loveda_official_and_converted_layouts_agree(tmp_path):
    masks = _loveda_masks()
    official, converted = tmp_path / "official", tmp_path / "mmseg"
    for stem, ids in masks.items():
        scene = "Rural" if stem == "11" else "Urban"
        write_png(official / "Val" / scene / "images_png" / f"{stem}.png", photo(32, 32, int(stem)))
        write_png(official / "Val" / scene / "masks_png" / f"{stem}.png", ids)
        write_png(converted / "img_dir" / "val" / f"{stem}.png", photo(32, 32, int(stem)))
        write_png(converted / "ann_dir" / "val" / f"{stem}.png", ids)
    write_png(official / "Test" / "Urban" / "images_png" / "5000.png", photo(32, 32))
    domain = RemoteSensingDomain()
    assert domain.detect_dataset(official).name == domain.detect_dataset(converted).name == "loveda"
    a, b = loveda.build(official, "val"), loveda.build(converted, "val")
    assert len(a) == len(b) == 2
    for i in range(2):
        sa, sb = a[i], b[i]
        assert sa["id"] == sb["id"] and torch.equal(sa["mask"], sb["mask"])
        assert torch.equal(sa["image"], sb["image"])
    s = b[0]  # "11": no-data -> ignore, 1..7 -> 0..6
    assert torch.equal(s["mask"], torch.from_numpy(quadrants(32, 32, (IGNORE_INDEX, 0, 1, 6))))
    assert s["label"].tolist() == [1, 1, 0, 0, 0, 0, 1]  # LoveDA's background is an ordinary class
    assert loveda.LABEL_SPACE.foreground_names[0] == "background"
    rural = loveda.build(official, "val", scene="rural")
    assert len(rural) == 1 and rural[0]["meta"]["scene"] == "rural"
    assert "label" not in loveda.build(official, "test")[0]
    write_png(converted / "ann_dir" / "val" / "2600.png", np.full((32, 32), 9))
    with pytest.raises(DataError, match=r"2600\.png.*id 9"):
        loveda.build(converted, "val")[1]


# ---------------------------------------------------------------------------------------------
# Vaihingen


def test_vaihingen_converted_ids_and_official_eroded_colours(tmp_path):
    converted = tmp_path / "mmseg"
    ids = quadrants(32, 32, (0, 1, 5, 6))  # 0 = boundary
    write_png(converted / "img_dir" / "val" / "area6_0_0_32_32.png", photo(32, 32))
    write_png(converted / "ann_dir" / "val" / "area6_0_0_32_32.png", ids)
    assert RemoteSensingDomain().detect_dataset(converted).name == "vaihingen"
    s = isprs.VAIHINGEN.build(converted, "val")[0]
    assert torch.equal(s["mask"], torch.from_numpy(quadrants(32, 32, (IGNORE_INDEX, 0, 4, 5))))
    assert s["label"].tolist() == [1, 0, 0, 0, 1, 1]

    official = tmp_path / "official"
    colours = [*isprs.PALETTE, (0, 0, 0)]
    gt = quadrants(32, 32, (0, 1, 2, 3))
    eroded = gt.copy()
    eroded[:, 15:17] = 6
    write_tif(official / "top" / "top_mosaic_09cm_area1.tif", np.moveaxis(photo(32, 32), -1, 0))
    write_tif(
        official / "gts_for_participants" / "top_mosaic_09cm_area1.tif",
        np.moveaxis(paint(gt, colours), -1, 0),
    )
    write_tif(
        official / "eroded" / "top_mosaic_09cm_area1_noBoundary.tif",
        np.moveaxis(paint(eroded, colours), -1, 0),
    )
    assert RemoteSensingDomain().detect_dataset(official).name == "vaihingen"
    ds = isprs.VAIHINGEN.build(official, "train")
    assert len(ds) == 1 and ds[0]["id"] == "area1"
    assert torch.equal(ds[0]["mask"], torch.from_numpy(np.where(eroded == 6, IGNORE_INDEX, gt)))
    assert torch.equal(
        isprs.VAIHINGEN.build(official, "train", eroded=False)[0]["mask"], torch.from_numpy(gt)
    )
    magenta = paint(gt, colours)
    magenta[3, 4] = (255, 0, 255)
    write_tif(official / "eroded" / "top_mosaic_09cm_area1_noBoundary.tif", np.moveaxis(magenta, -1, 0))
    with pytest.raises(DataError, match=r"area1_noBoundary\.tif.*\(255, 0, 255\) at \(row 3, col 4\)"):
        isprs.VAIHINGEN.build(official, "train")[0]


# ---------------------------------------------------------------------------------------------
# iSAID


def test_isaid_semantic_colour_masks_with_threshold_background(tmp_path):
    ids = np.zeros((40, 40), dtype=np.int64)
    ids[5:15, 5:15] = 14  # plane
    ids[20:30, 20:35] = 1  # ship
    write_png(tmp_path / "val" / "images" / "P0003.png", photo(40, 40))
    write_png(
        tmp_path / "val" / "Semantic_masks" / "images" / "P0003_instance_color_RGB.png",
        paint(ids, list(isaid.PALETTE)),
    )
    assert RemoteSensingDomain().detect_dataset(tmp_path).name == "isaid"
    space = isaid.LABEL_SPACE
    assert space.background_mode is BackgroundMode.THRESHOLD and space.background_index == 0
    s = isaid.build(tmp_path, "val")[0]
    assert s["id"] == "P0003" and torch.equal(s["mask"], torch.from_numpy(ids))
    label = dict(zip(space.foreground_names, s["label"].tolist(), strict=True))
    assert len(label) == 15 and {k for k, v in label.items() if v} == {"plane", "ship"}
    tiles = isaid.build(tmp_path, "val", labels_from_masks=True, patch_size=20)
    assert [t["label"].sum().item() for t in (tiles[i] for i in range(len(tiles)))] == [1, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# Dubai aerial


def _dubai(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    base = root / dubai.FOLDER
    expected = {}
    colours = [*dubai.PALETTE, dubai.UNLABELED, dubai.STRAY]
    for k, palette_png in ((1, False), (2, True)):
        for part in (1, 2):
            ids = quadrants(24, 30, (k - 1, part + 1, 4, 5))
            ids[2, 3] = 6  # a stray black pixel
            folder = base / f"Tile {k}"
            write_jpg(folder / "images" / f"image_part_00{part}.jpg", photo(24, 30, 10 * k + part))
            if palette_png:
                # Palette order differs from the class order, as in the real tile 2 masks.
                order = [5, 2, 0, 1, 3, 4, 6]
                inverse = np.argsort(order)
                write_palette_png(
                    folder / "masks" / f"image_part_00{part}.png", inverse[ids], [colours[i] for i in order]
                )
            else:
                write_png(folder / "masks" / f"image_part_00{part}.png", paint(ids, colours))
            expected[f"tile{k}/image_part_00{part}"] = np.where(ids >= 5, IGNORE_INDEX, ids)
    (base / "classes.json").write_text("{}")
    return base, expected


def test_dubai_palette_and_rgb_masks_stray_black_and_tile_splits(tmp_path):
    base, expected = _dubai(tmp_path)
    domain = RemoteSensingDomain()
    assert domain.detect_dataset(tmp_path).name == domain.detect_dataset(base).name == "dubai-aerial"
    ds = dubai.build(tmp_path, "all")
    assert [ds[i]["id"] for i in range(len(ds))] == sorted(expected)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["mask"], torch.from_numpy(expected[ds[i]["id"]]))
    assert len(dubai.build(base, "Tile 1,Tile 2")) == 4 and len(dubai.build(base, "tile2")) == 2
    held = dubai.build(base, "all[-2:]")
    assert [held[i]["id"] for i in range(2)] == ["tile2/image_part_001", "tile2/image_part_002"]
    tiles = dubai.build(tmp_path, "Tile 2", labels_from_masks=True, patch_size=12)
    assert all(t["mask"].shape == (12, 12) for t in (tiles[i] for i in range(len(tiles))))
    with pytest.raises(ValueError, match="no tile 'Tile 7'"):
        dubai.build(base, "Tile 1,Tile 7")
    write_png(base / "Tile 1" / "masks" / "image_part_001.png", paint(np.zeros((24, 30), int), [(1, 2, 3)]))
    with pytest.raises(DataError, match=r"Tile 1/masks/image_part_001\.png.*colour \(1, 2, 3\)"):
        dubai.build(base, "tile1")[0]


# ---------------------------------------------------------------------------------------------
# detection, registry, hooks


def test_detection_none_and_ambiguous(tmp_path):
    domain = RemoteSensingDomain()
    with pytest.raises(ValueError, match="no 'remote-sensing' dataset layout"):
        domain.detect_dataset(tmp_path)
    _deepglobe(tmp_path, n=1)
    _dubai(tmp_path)
    with pytest.raises(ValueError, match="ambiguous between deepglobe, dubai-aerial"):
        domain.detect_dataset(tmp_path)
    assert isinstance(create_domain("remote-sensing"), RemoteSensingDomain)


def test_kappa_and_overall_accuracy_by_hand():
    conf = torch.tensor([[50, 10], [5, 35]])
    # OA = 85/100; p_e = (60*55 + 40*45) / 100^2 = 0.51; kappa = 0.34 / 0.49
    assert overall_accuracy(conf) == pytest.approx(0.85)
    assert cohen_kappa(conf) == pytest.approx(0.34 / 0.49)
    # An unassigned column counts as wrong: p_o = 85/105, p_e = 5375/11025, kappa = 3550/5650.
    assert cohen_kappa(torch.tensor([[50, 10, 5], [5, 35, 0]])) == pytest.approx(3550 / 5650)
    assert cohen_kappa(torch.tensor([[7, 0], [0, 3]])) == pytest.approx(1.0)
    results = RemoteSensingDomain().metrics(conf, LabelSpace(("a", "b"), ((0, 0, 0), (1, 1, 1))))
    assert {r.name: r.value for r in results} == pytest.approx(
        {"overall_accuracy": 0.85, "kappa": 0.34 / 0.49}
    )
    assert math.isnan(overall_accuracy(torch.zeros(3, 3)))


def test_augment_is_a_shared_dihedral_transform():
    mask = torch.arange(16).reshape(4, 4)
    sample = {"image": mask.float().expand(3, 4, 4).clone(), "mask": mask, "exclude": mask > 10, "id": "x"}
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(64):
        out = flip_rotate(sample, gen)
        assert torch.equal(out["image"][0].long(), out["mask"]) and torch.equal(
            out["exclude"], out["mask"] > 10
        )
        seen.add(tuple(out["mask"].flatten().tolist()))
    assert len(seen) == 8
    wide = flip_rotate({"image": torch.rand(3, 4, 6), "id": "w"}, gen)
    assert wide["image"].shape == (3, 4, 6)


def test_clip_prompts_and_sam_strategy(monkeypatch):
    data = {
        "templates": ["an aerial image of {}."],
        "datasets": {
            "isaid": {"classes": {"plane": ["airplane", "aircraft"]}, "background": ["runway"]},
            "dubai": {"classes": {"Land": ["bare land"]}},
        },
    }
    monkeypatch.setattr(prompt_files, "load_prompt_file", lambda domain: data)
    with pytest.warns(UserWarning, match="no prompt for"):
        prompts = clip_prompts_for("isaid", isaid.LABEL_SPACE)
    assert "background" not in prompts.class_names and len(prompts.class_names) == 15
    assert prompts.class_names["plane"] == ("airplane", "aircraft")
    assert prompts.class_names["storage_tank"] == ("storage_tank",)
    assert tuple(prompts.templates) == ("an aerial image of {}.",) and tuple(prompts.background) == (
        "runway",
    )
    with pytest.warns(UserWarning):
        assert clip_prompts_for("dubai-aerial", dubai.LABEL_SPACE).class_names["land"] == ("bare land",)
    plain = clip_prompts_for("deepglobe", deepglobe.LABEL_SPACE)  # no entry: class names
    assert plain.class_names == {c: (c,) for c in deepglobe.CLASSES} and plain.templates

    def missing(domain):
        raise FileNotFoundError(domain)

    monkeypatch.setattr(prompt_files, "load_prompt_file", missing)
    assert clip_prompts_for("isprs", isprs.LABEL_SPACE).class_names["low_vegetation"] == ("low vegetation",)
    domain = RemoteSensingDomain()
    assert set(domain.clip_prompts(loveda.LABEL_SPACE).class_names) == set(loveda.CLASSES)
    sam = domain.sam_strategy()
    assert sam.prompt in (PromptKind.POINTS, PromptKind.EVERYTHING) and sam.model == "vit_b"
