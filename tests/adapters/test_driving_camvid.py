"""CamVid loader on a tiny SegNet-layout fixture: list files with /SegNet/CamVid/ paths, 11 -> 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wsss_adapters.driving import camvid
from wsss_adapters.driving.labels import CAMVID

from wsss_domains.data.io import DataError


def _mask(seed: int) -> np.ndarray:
    """6x8 mask holding every id 0..11 (11 = Unlabelled)."""
    ids = np.arange(48, dtype=np.uint8).reshape(6, 8) % 12
    return np.roll(ids, seed)


def write_camvid(
    root: Path,
    split: str = "train",
    stems: tuple[str, ...] = ("0001TP_006690", "0001TP_006720"),
    suffix: str = ".jpg",
    listed_suffix: str | None = None,
    with_list: bool = True,
) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, stem in enumerate(stems):
        Image.fromarray(np.full((6, 8, 3), 40 * i, dtype=np.uint8)).save(root / split / f"{stem}{suffix}")
        Image.fromarray(_mask(i), mode="L").save(root / f"{split}annot" / f"{stem}.png")
        listed = listed_suffix or suffix
        lines.append(f"/SegNet/CamVid/{split}/{stem}{listed} /SegNet/CamVid/{split}annot/{stem}.png")
    if with_list:
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_list_file_paths_resolve_inside_the_folder(tmp_path):
    write_camvid(tmp_path)
    ds = camvid.build(tmp_path, "train")
    assert len(ds) == 2
    sample = ds[1]
    assert sample["id"] == "0001TP_006720"
    assert Path(sample["meta"]["path"]) == tmp_path / "train" / "0001TP_006720.jpg"
    assert sample["image"].shape == (3, 6, 8)


def test_unlabelled_becomes_ignore(tmp_path):
    write_camvid(tmp_path)
    sample = camvid.build(tmp_path, "train")[0]
    raw = torch.from_numpy(_mask(0).astype(np.int64))
    assert torch.equal(sample["mask"], torch.where(raw == 11, torch.tensor(255), raw))
    assert int((sample["mask"] == 255).sum()) == 4
    assert torch.equal(sample["label"], torch.ones(11))  # 4 px of 44 scored each (9%)


def test_listed_png_found_as_reencoded_jpeg(tmp_path):
    write_camvid(tmp_path, suffix=".jpg", listed_suffix=".png")
    assert camvid.build(tmp_path, "train")[0]["meta"]["path"].endswith(".jpg")


def test_png_images_and_folder_pairing_without_list(tmp_path):
    write_camvid(tmp_path, split="val", suffix=".png", with_list=False)
    ds = camvid.build(tmp_path, "val")
    assert [ds[i]["id"] for i in range(len(ds))] == ["0001TP_006690", "0001TP_006720"]
    assert camvid.detect(tmp_path)


def test_bad_ids_and_lines_are_errors_naming_the_file(tmp_path):
    write_camvid(tmp_path)
    bad = tmp_path / "trainannot" / "0001TP_006690.png"
    Image.fromarray(np.full((6, 8), 12, dtype=np.uint8), mode="L").save(bad)
    with pytest.raises(DataError, match="0001TP_006690.png.*id 12"):
        camvid.build(tmp_path, "train")[0]
    (tmp_path / "train.txt").write_text("/SegNet/CamVid/train/0001TP_006690.jpg\n")
    with pytest.raises(DataError, match="line 1"):
        camvid.build(tmp_path, "train")
    (tmp_path / "train.txt").write_text("/SegNet/CamVid/train/nope.jpg /SegNet/CamVid/trainannot/nope.png\n")
    with pytest.raises(DataError, match="not found"):
        camvid.build(tmp_path, "train")


def test_detection_and_splits(tmp_path):
    assert not camvid.detect(tmp_path)
    write_camvid(tmp_path, split="test")
    assert camvid.detect(tmp_path)
    assert len(camvid.build(tmp_path, "test")) == 2
    with pytest.raises(DataError, match="train"):
        camvid.build(tmp_path, "train")
    with pytest.raises(ValueError, match="no split"):
        camvid.build(tmp_path, "trainval")


def test_label_space():
    assert CAMVID.classes == (
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    )
    assert CAMVID.background_mode.value == "none"


def test_a_list_entry_cannot_lead_outside_the_dataset_folder(tmp_path):
    from wsss_adapters.driving.camvid import _inside

    assert _inside(tmp_path, "/SegNet/CamVid/train/0001.png") == tmp_path / "train" / "0001.png"
    for entry in ("/x/../secret.jpg", "train/.."):
        with pytest.raises(ValueError, match="leads outside the dataset folder"):
            _inside(tmp_path, entry)
