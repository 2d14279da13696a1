"""The generic folder format: classes.json/.txt, masks or labels.csv, splits, exclude, demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wsss_adapters.custom import folder
from wsss_adapters.custom.classes import read_label_space
from wsss_adapters.custom.labels_csv import parse_labels

from wsss_domains.data.io import DataError
from wsss_domains.domains import create_domain
from wsss_domains.domains.contract import BackgroundMode


def _image(path: Path, h: int = 4, w: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 50, dtype=np.uint8)).save(path)


def write_masked(root: Path) -> None:
    """Two images with index masks, background class, a void pixel."""
    (root / "classes.json").write_text(
        json.dumps(
            {
                "classes": ["background", "crack", {"name": "rust", "color": [200, 80, 0]}],
                "background": "background",
            }
        )
    )
    for name, ids in {"a": [[0, 1], [2, 255]], "b": [[0, 0], [0, 2]]}.items():
        _image(root / "images" / f"{name}.jpg", 2, 2)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.array(ids, dtype=np.uint8), mode="L").save(root / "masks" / f"{name}.png")


def write_csv_only(root: Path, rows: str) -> None:
    (root / "classes.txt").write_text("cat\ndog #ff0000\ntraffic light\n")
    for name in ("x", "y", "z"):
        _image(root / "images" / f"{name}.png")
    (root / "labels.csv").write_text("image,labels\n" + rows)


def test_classes_json_gives_label_space(tmp_path):
    write_masked(tmp_path)
    space = read_label_space(tmp_path)
    assert space.classes == ("background", "crack", "rust")
    assert space.background_mode is BackgroundMode.THRESHOLD and space.background_index == 0
    assert space.palette[2] == (200, 80, 0) and space.palette[0] == (0, 0, 0)
    assert folder.SPEC.label_space_for(tmp_path) == space


def test_classes_txt_without_background(tmp_path):
    write_csv_only(tmp_path, "x.png,cat\n")
    space = read_label_space(tmp_path)
    assert space.classes == ("cat", "dog", "traffic light")
    assert space.palette[1] == (255, 0, 0)
    assert space.background_mode is BackgroundMode.NONE and space.background_index is None
    assert len(set(space.palette)) == 3


def test_masks_give_labels(tmp_path):
    write_masked(tmp_path)
    ds = folder.build(tmp_path, "all")
    a, b = ds[0], ds[1]
    assert a["id"] == "a" and a["image"].shape == (3, 2, 2)
    assert a["mask"].tolist() == [[0, 1], [2, 255]]
    assert a["label"].tolist() == [1.0, 1.0] and b["label"].tolist() == [0.0, 1.0]


def test_labels_csv_names_and_vectors(tmp_path):
    write_csv_only(tmp_path, "x.png,cat;traffic light\ny,0;1;0\nz.png,1 1 0\n")
    ds = folder.build(tmp_path, "all")
    assert [ds[i]["label"].tolist() for i in range(3)] == [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    assert "mask" not in ds[0]
    with pytest.raises(DataError, match="without masks"):
        folder.build(tmp_path, "all", labels_from_masks=True)


def test_vector_over_all_classes_drops_background(tmp_path):
    (tmp_path / "classes.json").write_text(
        json.dumps({"classes": ["background", "a", "b"], "background": "background"})
    )
    space = read_label_space(tmp_path)
    assert parse_labels("0;1;1", space).tolist() == [1.0, 1.0]
    assert parse_labels("1;0", space).tolist() == [1.0, 0.0]
    assert parse_labels("background;b", space).tolist() == [0.0, 1.0]
    assert parse_labels("", space).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="4 entries"):
        parse_labels("0;1;1;0", space)


def test_csv_errors_name_file_and_row(tmp_path):
    write_csv_only(tmp_path, "x.png,cat\ny.png,wolf\n")
    with pytest.raises(DataError, match=r"labels.csv: row 3: unknown class name\(s\) \['wolf'\]"):
        folder.build(tmp_path, "all")
    write_csv_only(tmp_path, "missing.png,cat\n")
    with pytest.raises(DataError, match="'missing.png' not found"):
        folder.build(tmp_path, "all")
    write_csv_only(tmp_path, "x.png,cat\n")
    with pytest.raises(DataError, match="y.png: no label"):
        folder.build(tmp_path, "all")


def test_splits_lists(tmp_path):
    write_masked(tmp_path)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a.jpg\n")
    (tmp_path / "splits" / "val.txt").write_text("b\n")
    assert [s["id"] for s in folder.build(tmp_path, "train")] == ["a"]
    assert [folder.build(tmp_path, "val")[0]["id"]] == ["b"]
    with pytest.raises(DataError, match="splits here: all, train, val"):
        folder.build(tmp_path, "test")


def test_rgb_masks_and_exclude(tmp_path):
    write_masked(tmp_path)
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[1, 1] = (200, 80, 0)  # rust
    Image.fromarray(rgb).save(tmp_path / "masks" / "b.png")
    (tmp_path / "exclude").mkdir()
    Image.fromarray(np.array([[1, 0], [0, 0]], dtype=np.uint8), mode="L").save(tmp_path / "exclude" / "b.png")
    sample = folder.build(tmp_path, "all")[1]
    assert sample["mask"].tolist() == [[255, 0], [0, 2]]
    assert sample["exclude"].tolist() == [[True, False], [False, False]]
    rgb[0, 1] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "masks" / "b.png")
    with pytest.raises(DataError, match=r"b.png: colour .* at \(0, 1\) is not a known class colour"):
        folder.build(tmp_path, "all")[1]


def test_bad_declarations(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "background": "c"}))
    with pytest.raises(DataError, match="background class 'c'"):
        read_label_space(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "a"]}))
    with pytest.raises(DataError, match="unique"):
        read_label_space(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a"], "background_mode": "sometimes"}))
    with pytest.raises(DataError, match="background_mode"):
        read_label_space(tmp_path)


def test_patches_and_detection(tmp_path):
    write_masked(tmp_path)
    assert folder.detect(tmp_path) and not folder.detect(tmp_path / "images")
    patches = folder.build(tmp_path, "all", labels_from_masks=True, patch_size=1)
    assert len(patches) == 7  # 8 pixels, one of them void
    assert all(
        torch.equal(p["label"], folder.read_label_space(tmp_path).label_from_mask(p["mask"])) for p in patches
    )


def test_demo_round_trip(tmp_path):
    domain = create_domain("custom")
    demo = domain.demo(tmp_path)
    name, root = demo.dataset, demo.root
    assert (demo.train_split, demo.eval_split) == ("train", "val")
    spec = domain.detect_dataset(root)
    assert spec.name == name == "folder"
    space = spec.label_space_for(root)
    train = spec.build(root, "train")
    assert len(train) == 8 and len(spec.build(root, "val")) == 4
    for i in range(len(train)):
        sample = train[i]
        # labels.csv was written from the masks, so both label sources agree
        assert torch.equal(sample["label"], space.label_from_mask(sample["mask"]))


def test_image_file_names_pixels_and_labels_without_decoding(tmp_path, monkeypatch):
    write_masked(tmp_path)
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,crack\n")
    ds = folder.build(tmp_path, "all")
    monkeypatch.setattr(folder, "read_rgb", lambda path: pytest.fail(f"{path} decoded"))
    a, b = ds.image_file(0), ds.image_file(1)
    assert (a.id, a.path.name, a.mask.name, a.label.tolist()) == ("a", "a.jpg", "a.png", [1.0, 0.0])
    assert (b.id, b.label, b.mask.name) == ("b", None, "b.png")  # labels come from the mask
    assert folder.build(tmp_path, "all", label_source="mask").image_file(0).label is None
    (tmp_path / "exclude").mkdir()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8), mode="L").save(tmp_path / "exclude" / "b.png")
    assert folder.build(tmp_path, "all").image_file(1) is None  # exclude masks: decoded whole
