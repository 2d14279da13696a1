"""Cityscapes loader on a tiny fixture in the real layout: labelIds -> trainIds, trainIds files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wsss_adapters.driving import cityscapes
from wsss_adapters.driving.labels import CITYSCAPES, label_ids_to_train_ids

from wsss_domains.data.io import DataError

# The official labelId -> trainId table for the 19 evaluated classes; every other id is ignored.
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
OFFICIAL |= {26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _ids_grid() -> np.ndarray:
    """Every labelId 0..33 in a 2x34 mask (second row reversed)."""
    row = np.arange(34, dtype=np.uint8)
    return np.stack([row, row[::-1]])


def write_cityscapes(
    root: Path, split: str = "train", city: str = "aachen", train_ids: np.ndarray | None = None
) -> str:
    stem = f"{city}_000000_000019"
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    ids = _ids_grid()
    Image.fromarray(np.full((*ids.shape, 3), 90, dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
    Image.fromarray(ids, mode="L").save(gt_dir / f"{stem}_gtFine_labelIds.png")
    if train_ids is not None:
        Image.fromarray(train_ids.astype(np.uint8), mode="L").save(
            gt_dir / f"{stem}_gtFine_labelTrainIds.png"
        )
    return stem


def _expected(ids: np.ndarray) -> torch.Tensor:
    return torch.tensor([[OFFICIAL.get(int(v), 255) for v in row] for row in ids])


def test_label_ids_map_to_train_ids_with_ignore():
    ids = torch.from_numpy(_ids_grid().astype(np.int64))
    out = label_ids_to_train_ids(ids)
    assert torch.equal(out, _expected(_ids_grid()))
    # the ignored ids of the official table, explicitly
    for label_id in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30):
        assert int(label_ids_to_train_ids(torch.tensor([label_id]))[0]) == 255


def test_label_space_is_the_19_train_classes():
    assert CITYSCAPES.num_classes == 19
    assert CITYSCAPES.classes[0] == "road" and CITYSCAPES.classes[18] == "bicycle"
    assert CITYSCAPES.palette[13] == (0, 0, 142)  # car
    assert CITYSCAPES.background_index is None


def test_loader_derives_train_ids_from_label_ids(tmp_path):
    stem = write_cityscapes(tmp_path)
    ds = cityscapes.build(tmp_path, "train")
    assert len(ds) == 1
    sample = ds[0]
    assert sample["id"] == stem
    assert sample["image"].shape == (3, 2, 34)
    assert torch.equal(sample["mask"], _expected(_ids_grid()))
    # every train id covers 2 of 38 scored pixels (5%), above the 1% label threshold
    assert torch.equal(sample["label"], torch.ones(19))


def test_train_ids_file_preferred_but_label_ids_selectable(tmp_path):
    train_ids = np.full((2, 34), 5, dtype=np.uint8)
    train_ids[:, :3] = 255
    write_cityscapes(tmp_path, train_ids=train_ids)
    auto = cityscapes.build(tmp_path, "train")[0]
    assert torch.equal(auto["mask"], torch.from_numpy(train_ids.astype(np.int64)))
    assert auto["label"].nonzero().flatten().tolist() == [5]
    derived = cityscapes.build(tmp_path, "train", label_source="labelIds")[0]
    assert torch.equal(derived["mask"], _expected(_ids_grid()))


def test_missing_train_ids_file_when_forced(tmp_path):
    write_cityscapes(tmp_path)
    with pytest.raises(DataError, match="labelTrainIds"):
        cityscapes.build(tmp_path, "train", label_source="labelTrainIds")


def test_out_of_table_label_id_is_an_error_naming_the_file(tmp_path):
    stem = write_cityscapes(tmp_path)
    path = tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png"
    Image.fromarray(np.full((2, 34), 40, dtype=np.uint8), mode="L").save(path)
    with pytest.raises(DataError, match="labelIds"):
        cityscapes.build(tmp_path, "train")[0]


def test_bad_train_id_file(tmp_path):
    write_cityscapes(tmp_path, train_ids=np.full((2, 34), 19))
    with pytest.raises(DataError, match="train id 19"):
        cityscapes.build(tmp_path, "train")[0]


def test_split_without_annotations_has_no_mask(tmp_path):
    write_cityscapes(tmp_path, split="test", city="berlin")
    shutil.rmtree(tmp_path / "gtFine" / "test")
    sample = cityscapes.build(tmp_path, "test")[0]
    assert "mask" not in sample and sample["label"].sum() == 0
    with pytest.raises(DataError, match="without masks"):
        cityscapes.build(tmp_path, "test", labels_from_masks=True)


def test_missing_annotation_file_is_an_error(tmp_path):
    stem = write_cityscapes(tmp_path)
    (tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="annotation not found"):
        cityscapes.build(tmp_path, "train")


def test_splits_and_detection(tmp_path):
    write_cityscapes(tmp_path, split="val", city="frankfurt")
    assert cityscapes.detect(tmp_path)
    assert not cityscapes.detect(tmp_path / "gtFine")
    assert len(cityscapes.build(tmp_path, "val")) == 1
    with pytest.raises(ValueError, match="no split 'extra'"):
        cityscapes.build(tmp_path, "extra")
    with pytest.raises(DataError, match="split folder not found"):
        cityscapes.build(tmp_path, "train")


def test_crops_from_label_ids(tmp_path):
    write_cityscapes(tmp_path)
    crops = cityscapes.build(tmp_path, "train", labels_from_masks=True, crop_size=(1, 17))
    assert [c["id"].split("@")[1] for c in crops] == ["0,0", "0,17", "1,0", "1,17"]
    low, high = {0, 1, 2, 3, 4}, set(range(5, 19))  # train ids of labelIds 0..16 and 17..33
    assert [set(c["label"].nonzero().flatten().tolist()) for c in crops] == [low, high, high, low]
    assert crops[0]["image"].shape == (3, 1, 17)
    assert torch.equal(crops[3]["mask"], _expected(_ids_grid())[1:, 17:])
