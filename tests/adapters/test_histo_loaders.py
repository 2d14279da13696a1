"""Histology loaders on tiny fixtures in each dataset's real on-disk layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from histo_fixtures import (
    LUAD_PALETTE,
    WSSS4LUAD_PALETTE,
    make_glas,
    make_tissue,
    make_wsss4luad,
    save_palette,
)
from PIL import Image
from wsss_adapters.histo import HistoDomain

from wsss_domains.data.io import DataError
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains import create_domain


@pytest.fixture
def domain() -> HistoDomain:
    return HistoDomain()


def test_registered_under_entry_point():
    plugin = create_domain("histo")
    assert isinstance(plugin, HistoDomain)
    assert set(plugin.datasets()) == {"wsss4luad", "luad-histoseg", "bcss-wsss", "glas"}


# -- WSSS4LUAD -------------------------------------------------------------------------------


def test_wsss4luad_training_labels_from_names(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    spec = domain.detect_dataset(root)
    assert spec.name == "wsss4luad" and spec.splits == ("training", "validation", "test")
    ds = spec.build(root, "training")
    by_id = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    assert set(by_id) == {"436219-9328-56427-[1, 1, 0]", "449636-23526-9666-[0, 0, 1]"}
    s = by_id["436219-9328-56427-[1, 1, 0]"]
    assert s["image"].shape == (3, 30, 28) and s["image"].dtype == torch.float32
    assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert s["label"].tolist() == [1.0, 1.0, 0.0]
    assert by_id["449636-23526-9666-[0, 0, 1]"]["label"].tolist() == [0.0, 0.0, 1.0]
    assert "mask" not in s and "exclude" not in s  # glass comes from the domain's white-region hook
    assert spec.build(root, "train")[0]["label"].shape == (3,)  # alias


def test_wsss4luad_validation_ignore_and_exclude(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    ds = domain.dataset("wsss4luad").build(root, "validation")
    assert len(ds) == 2
    s0, s1 = ds[0], ds[1]
    assert s0["id"] == "00" and s0["mask"].shape == (40, 48) and s0["mask"].dtype == torch.int64
    # Quadrants tumour / normal / background / tumour: id 3 becomes 255 and is excluded.
    assert set(s0["mask"].unique().tolist()) == {0, 2, 255}
    assert torch.equal(s0["exclude"], s0["mask"] == 255)
    assert bool(s0["exclude"][20:, :24].all()) and not bool(s0["exclude"][:20].any())
    assert s0["label"].tolist() == [1.0, 0.0, 1.0]  # classes present in the mask
    # The background-mask strip is excluded (and unscored) although the class mask says stroma.
    assert bool(s1["exclude"][:4].all()) and not bool(s1["exclude"][4:].any())
    assert bool((s1["mask"][:4] == 255).all()) and bool((s1["mask"][4:] == 1).all())
    assert s1["label"].tolist() == [0.0, 1.0, 0.0]
    test = domain.dataset("wsss4luad").build(root, "test")
    assert test[0]["label"].tolist() == [0.0, 1.0, 1.0]


def test_wsss4luad_labels_from_masks_patches(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    spec = domain.dataset("wsss4luad")
    default = spec.build(root, "validation", labels_from_masks=True)
    assert isinstance(default, PatchDataset) and default.patch_size == spec.patch_size
    patches = spec.build(root, "validation", labels_from_masks=True, patch_size=20)
    assert isinstance(patches, PatchDataset) and patches.patch_size == 20
    labels = {patches[i]["id"]: patches[i]["label"].tolist() for i in range(len(patches))}
    # Image 00 (40x48) has 20x24 quadrants tumour, normal / background, tumour; 20 px windows
    # start at x = 0, 20, 28 (the last aligned to the border) and y = 0, 20.
    assert labels["00@0,0"] == [1.0, 0.0, 0.0]
    assert labels["00@0,20"] == [1.0, 0.0, 1.0]
    assert labels["00@0,28"] == [0.0, 0.0, 1.0]
    assert "00@20,0" not in labels  # all background: dropped
    assert labels["00@20,20"] == [1.0, 0.0, 0.0]
    assert len([k for k in labels if k.startswith("00@")]) == 5
    with pytest.raises(DataError, match="no masks"):
        spec.build(root, "training", labels_from_masks=True)


def test_wsss4luad_subfolder_suggests_parent(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    with pytest.raises(DataError, match=f"pass its parent {root}"):
        domain.dataset("wsss4luad").build(root / "2.validation", "validation")
    with pytest.raises(DataError, match="'2.validation' sub-folder"):
        domain.detect_dataset(root / "2.validation")


def test_wsss4luad_unknown_split_lists_splits(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    with pytest.raises(ValueError, match="training, validation, test"):
        domain.dataset("wsss4luad").build(root, "extra")


# -- errors name the file --------------------------------------------------------------------


def test_error_mask_size_mismatch(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    bad = root / "2.validation" / "mask" / "00.png"
    save_palette(bad, np.zeros((40, 47), dtype=np.uint8), WSSS4LUAD_PALETTE)
    ds = domain.dataset("wsss4luad").build(root, "validation")
    with pytest.raises(DataError, match="does not match image size") as err:
        ds[0]
    # the class mask is the odd one: it is named, not the background mask read after it
    assert err.value.path.name == "00.png" and err.value.path.parent.name == "mask"


def test_error_background_mask_size_mismatch_names_the_background_mask(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    bad = root / "2.validation" / "background-mask" / "00.png"
    save_palette(bad, np.zeros((40, 47), dtype=np.uint8), [(0, 0, 0), (255, 255, 255)])
    ds = domain.dataset("wsss4luad").build(root, "validation")
    with pytest.raises(DataError, match="does not match image size") as err:
        ds[0]
    assert err.value.path.parent.name == "background-mask"


def test_error_label_vector_wrong_length(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    bad = root / "1.training" / "1-2-3-[1, 0].png"
    Image.new("RGB", (8, 8)).save(bad)
    with pytest.raises(DataError, match="has 2 entries, expected 3") as err:
        domain.dataset("wsss4luad").build(root, "training")
    assert err.value.path == bad


def test_error_unknown_class_id(tmp_path, domain):
    root = make_tissue(tmp_path / "LUAD-HistoSeg", "luad")
    bad = root / "val" / "mask" / "sample-1.png"
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[3, 5] = 9
    save_palette(bad, mask, LUAD_PALETTE)
    ds = domain.dataset("luad-histoseg").build(root, "val")
    with pytest.raises(DataError, match=r"unknown class id 9 at \(3, 5\)") as err:
        ds[0]
    assert err.value.path == bad


def test_error_unreadable_image(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    bad = root / "1.training" / "436219-9328-56427-[1, 1, 0].png"
    bad.write_bytes(b"not a png at all")
    ds = domain.dataset("wsss4luad").build(root, "training")
    index = next(i for i, rec in enumerate(ds.records) if rec.image == bad)
    with pytest.raises(DataError, match="unreadable image") as err:
        ds[index]
    assert err.value.path == bad


def test_error_missing_mask_and_empty_split(tmp_path, domain):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    (root / "3.testing" / "mask" / "00.png").unlink()
    with pytest.raises(DataError, match="no mask for this image"):
        domain.dataset("wsss4luad").build(root, "test")
    empty = make_tissue(tmp_path / "BCSS-WSSS", "bcss")
    for path in (empty / "train").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="split 'training' holds no images"):
        domain.dataset("bcss-wsss").build(empty, "training")


# -- LUAD-HistoSeg and BCSS-WSSS -------------------------------------------------------------


@pytest.mark.parametrize("train_folder", ["train", "training"])
def test_luad_histoseg(tmp_path, domain, train_folder):
    root = make_tissue(tmp_path / "LUAD-HistoSeg", "luad", train_folder=train_folder)
    spec = domain.detect_dataset(root)
    assert spec.name == "luad-histoseg" and spec.splits == ("training", "val", "test")
    assert spec.label_space.classes == ("tumor_epithelium", "necrosis", "lymphocyte", "tumor_stroma")
    train = spec.build(root, "training")
    labels = {train[i]["id"]: train[i]["label"].tolist() for i in range(len(train))}
    assert labels == {
        "1031280-2300-27920-[1 0 0 1]": [1, 0, 0, 1],
        "385277-44539-46781-[0 1 1 0]": [0, 1, 1, 0],
    }
    val = spec.build(root, "val")[0]
    assert set(val["mask"].unique().tolist()) == {0, 3, 255}  # id 4 (white / exclude) is ignored
    assert torch.equal(val["exclude"], val["mask"] == 255)
    assert val["label"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert spec.build(root, "test")[0]["label"].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_bcss_wsss(tmp_path, domain):
    root = make_tissue(tmp_path / "BCSS-WSSS", "bcss")
    spec = domain.detect_dataset(root)
    assert spec.name == "bcss-wsss"
    assert spec.label_space.classes == ("tumor", "stroma", "lymphocyte", "necrosis")
    train = spec.build(root, "training")
    labels = sorted(train[i]["label"].tolist() for i in range(len(train)))
    assert labels == [[0, 0, 1, 0], [1, 1, 0, 1]]
    patches = spec.build(root, "val", labels_from_masks=True, patch_size=16)
    assert sorted(patches[i]["label"].tolist() for i in range(len(patches))) == [
        [0, 0, 0, 1],
        [1, 0, 0, 0],
    ]  # two all-exclude quadrants dropped


def test_tissue_layouts_detected_by_palette_without_training(tmp_path, domain):
    luad = make_tissue(tmp_path / "luad", "luad", with_train=False)
    bcss = make_tissue(tmp_path / "bcss", "bcss", with_train=False)
    assert domain.detect_dataset(luad).name == "luad-histoseg"
    assert domain.detect_dataset(bcss).name == "bcss-wsss"
    with pytest.raises(DataError, match="'val' sub-folder of a bcss-wsss dataset"):
        domain.detect_dataset(bcss / "val")


# -- GlaS ------------------------------------------------------------------------------------


def test_glas_splits_binarised_and_patch_labels(tmp_path, domain):
    root = make_glas(tmp_path / "GlaS")
    spec = domain.detect_dataset(root)
    assert spec.name == "glas" and spec.splits == ("train", "testA", "testB")
    ls = spec.label_space
    assert ls.classes == ("background", "gland") and ls.background_index == 0
    train = spec.build(root, "train")
    assert [train[i]["id"] for i in range(len(train))] == ["train_1", "train_2"]
    s = train[0]
    assert set(s["mask"].unique().tolist()) == {0, 1}  # instance ids 1 and 7 become gland
    assert int(s["mask"].sum()) == 16 * 16 + 14 * 20
    assert s["label"].tolist() == [1.0] and "exclude" not in s
    assert [spec.build(root, split)[0]["id"] for split in ("testA", "testB")] == ["testA_1", "testB_1"]
    patches = spec.build(root, "train", labels_from_masks=True, patch_size=16)
    seen = set()
    for i in range(len(patches)):
        p = patches[i]
        assert p["label"].tolist() == [float(bool((p["mask"] == 1).any()))]
        seen.add(p["label"].item())
    assert seen == {0.0, 1.0}  # patches with and without gland


def test_glas_missing_annotation(tmp_path, domain):
    root = make_glas(tmp_path / "GlaS")
    (root / "testB_1_anno.bmp").unlink()
    with pytest.raises(DataError, match="no annotation") as err:
        domain.dataset("glas").build(root, "testB")
    assert err.value.path.name == "testB_1.bmp"


# -- detection -------------------------------------------------------------------------------


def test_detect_unknown_and_ambiguous(tmp_path, domain):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no 'histo' dataset layout recognised"):
        domain.detect_dataset(unknown)
    both = make_glas(make_wsss4luad(tmp_path / "both"))
    with pytest.raises(ValueError, match="ambiguous between wsss4luad, glas"):
        domain.detect_dataset(both)


def test_two_images_of_one_name_are_refused_by_name(tmp_path):
    from PIL import Image
    from wsss_adapters.histo.dataset import list_images

    from wsss_domains.data.io import DataError

    for name in ("01.png", "01.jpg", "02.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    with pytest.raises(DataError, match="01.png: has the same name as 01.jpg"):
        list_images(tmp_path)
