"""COCO loader on a tiny fixture: instances JSON with polygons and a crowd RLE, via pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from wsss_adapters.natural import coco

from wsss_domains.data.io import DataError

H, W = 10, 12
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]


def _crowd_rle() -> dict:
    region = np.zeros((H, W), dtype=np.uint8)
    region[:, 7:] = 1  # columns 7..11, overlapping the person's right edge
    rle = mask_utils.encode(np.asfortranarray(region))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco(root: Path, split: str = "train2017", categories: list[dict] | None = None) -> None:
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "000000000002.jpg", "height": H, "width": W},
    ]
    for info in images:
        Image.fromarray(np.full((H, W, 3), 120, dtype=np.uint8)).save(root / split / info["file_name"])
    anns = [
        # person: a large square, painted first
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 64.0,
         "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]], "bbox": [0, 0, 8, 8]},
        # dog: small, on top of the person
        {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 9.0,
         "segmentation": [[2, 2, 5, 2, 5, 5, 2, 5]], "bbox": [2, 2, 3, 3]},
        # a crowd of toothbrushes as compressed RLE
        {"id": 12, "image_id": 1, "category_id": 90, "iscrowd": 1, "area": 50.0,
         "segmentation": _crowd_rle(), "bbox": [7, 0, 5, 10]},
    ]  # fmt: skip
    data = {"images": images, "annotations": anns, "categories": categories or CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_category_ids_map_to_contiguous_1_to_80():
    assert len(coco.COCO_CATEGORIES) == 80 and coco.COCO.num_classes == 81
    assert coco.CONTIGUOUS[1] == 1 and coco.CONTIGUOUS[13] == 12 and coco.CONTIGUOUS[18] == 17
    assert coco.CONTIGUOUS[90] == 80
    assert coco.COCO.classes[17] == "dog" and coco.COCO.background_index == 0


def test_rasterised_mask_with_crowd_ignore(tmp_path):
    write_coco(tmp_path)
    ds = coco.build(tmp_path, "train2017")
    assert len(ds) == 2
    sample = ds[0]
    assert sample["id"] == "000000000001" and sample["image"].shape == (3, H, W)
    mask = sample["mask"]
    assert int(mask[3, 3]) == 17  # dog drawn over the person
    assert int(mask[6, 6]) == 1  # person
    assert int(mask[4, 7]) == 1  # person inside the crowd region: the instance wins
    assert int(mask[4, 10]) == 255  # crowd only: ignored
    assert int(mask[9, 3]) == 0  # background
    # labels from the annotations, crowd category included
    assert (sample["label"].nonzero().flatten() + 1).tolist() == [1, 17, 80]
    by_mask = coco.build(tmp_path, "train2017", label_source="mask")[0]["label"]
    assert (by_mask.nonzero().flatten() + 1).tolist() == [1, 17]


def test_image_without_annotations(tmp_path):
    write_coco(tmp_path)
    empty = coco.build(tmp_path, "train2017")[1]
    assert empty["label"].sum() == 0 and int(empty["mask"].max()) == 0


def test_category_names_are_checked(tmp_path):
    write_coco(tmp_path, categories=[{"id": 1, "name": "person"}, {"id": 18, "name": "cat"}])
    with pytest.raises(DataError, match="'cat'"):
        coco.build(tmp_path, "train2017")


def test_converted_masks_folder(tmp_path):
    (tmp_path / "val2014").mkdir()
    (tmp_path / "SegmentationClass" / "val2014").mkdir(parents=True)
    stem = "COCO_val2014_000000000042"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "val2014" / f"{stem}.jpg")
    ids = np.array([[0, 0, 5, 5], [0, 80, 5, 5], [255, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "SegmentationClass" / "val2014" / f"{stem}.png")
    assert coco.detect(tmp_path)
    sample = coco.build(tmp_path, "val2014")[0]
    assert torch.equal(sample["mask"], torch.from_numpy(ids.astype(np.int64)))
    assert (sample["label"].nonzero().flatten() + 1).tolist() == [5, 80]
    Image.fromarray(np.full((4, 4), 81, dtype=np.uint8), mode="L").save(
        tmp_path / "SegmentationClass" / "val2014" / f"{stem}.png"
    )
    with pytest.raises(DataError, match="class id 81"):
        coco.build(tmp_path, "val2014")[0]


def test_splits_detection_and_missing_files(tmp_path):
    assert not coco.detect(tmp_path)
    write_coco(tmp_path, split="val2017")
    assert coco.detect(tmp_path)
    with pytest.raises(ValueError, match="no split"):
        coco.build(tmp_path, "test2017")
    with pytest.raises(DataError, match="train2017"):
        coco.build(tmp_path, "train2017")
    (tmp_path / "val2017" / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match="not found"):
        coco.build(tmp_path, "val2017")


def test_patches_from_rasterised_masks(tmp_path):
    write_coco(tmp_path)
    patches = coco.build(tmp_path, "train2017", labels_from_masks=True, patch_size=6)
    # each 10x12 image gives a 2x2 grid of 6x6 patches; none is entirely ignore
    assert len(patches) == 8
    first = patches[0]
    assert first["image"].shape == (3, 6, 6)
    assert torch.equal(first["label"], coco.COCO.label_from_mask(first["mask"]))
