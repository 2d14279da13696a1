"""VOC 2012 loader on a tiny fixture in the real layout: XML labels, palette masks, 255 void, Aug."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wsss_adapters.natural import voc
from wsss_adapters.natural.palette import voc_color

from wsss_domains.data.io import DataError

XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult>{parts}</object>"


def _xml(image_id: str, names: list[str], difficult: tuple[int, ...] = ()) -> str:
    objects = ""
    for i, name in enumerate(names):
        parts = "<part><name>head</name></part><part><name>hand</name></part>" if name == "person" else ""
        objects += OBJECT.format(name=name, difficult=int(i in difficult), parts=parts)
    return XML.format(id=image_id, objects=objects)


def _palette_png(path: Path, ids: np.ndarray) -> None:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette([c for i in range(256) for c in voc_color(i)])
    image.save(path)


def write_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 with a masked train image, a masked val image and an Aug-only image."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in (
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "Annotations",
        "ImageSets/Segmentation",
    ):
        (base / sub).mkdir(parents=True)
    ids = {"2007_000032": None, "2007_000039": None, "2011_003276": None}
    for image_id in ids:
        Image.fromarray(np.full((6, 8, 3), 100, dtype=np.uint8)).save(base / "JPEGImages" / f"{image_id}.jpg")
    # train image: aeroplane (1) and person (15) with a void border
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1:3, 1:4] = 1
    mask[3:5, 4:7] = 15
    mask[0, :] = 255
    _palette_png(base / "SegmentationClass" / "2007_000032.png", mask)
    (base / "Annotations" / "2007_000032.xml").write_text(
        _xml("2007_000032", ["aeroplane", "person", "person", "bottle"], difficult=(3,))
    )
    # val image: tvmonitor (20), no XML
    val = np.zeros((6, 8), dtype=np.uint8)
    val[2:4, 2:6] = 20
    _palette_png(base / "SegmentationClass" / "2007_000039.png", val)
    # augmented-only image: grey ids, dog (12)
    aug = np.full((6, 8), 12, dtype=np.uint8)
    aug[:, :2] = 0
    Image.fromarray(aug, mode="L").save(base / "SegmentationClassAug" / "2011_003276.png")
    (base / "Annotations" / "2011_003276.xml").write_text(_xml("2011_003276", ["dog"]))
    lists = base / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("2007_000032\n")
    (lists / "val.txt").write_text("2007_000039\n")
    (lists / "train_aug.txt").write_text("2007_000032\n2011_003276\n")
    return base


def test_palette_is_the_voc_colour_map():
    assert voc.VOC.palette[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
    assert voc.VOC.palette[15] == (192, 128, 128)  # person
    assert voc.VOC.palette[20] == (0, 64, 128)  # tvmonitor
    assert voc.VOC.ignore_color == (224, 224, 192)
    assert voc.VOC.num_classes == 21 and voc.VOC.background_index == 0


def test_train_sample_labels_from_xml_and_void(tmp_path):
    write_voc(tmp_path)
    ds = voc.build(tmp_path, "train")
    sample = ds[0]
    assert sample["id"] == "2007_000032" and sample["image"].shape == (3, 6, 8)
    assert set(sample["mask"].unique().tolist()) == {0, 1, 15, 255}
    assert int((sample["mask"] == 255).sum()) == 8
    # XML: aeroplane, person and the difficult bottle (not in the mask); part names ignored
    assert (sample["label"].nonzero().flatten() + 1).tolist() == [1, 5, 15]
    assert sample["meta"]["label_source"] == "xml"
    from_mask = voc.build(tmp_path, "train", label_source="mask")[0]
    assert (from_mask["label"].nonzero().flatten() + 1).tolist() == [1, 15]


def test_label_from_mask_without_xml(tmp_path):
    write_voc(tmp_path)
    sample = voc.build(tmp_path, "val")[0]
    assert (sample["label"].nonzero().flatten() + 1).tolist() == [20]
    assert sample["meta"]["label_source"] == "mask"
    with pytest.raises(DataError, match="label_source='xml'"):
        voc.build(tmp_path, "val", label_source="xml")


def test_trainaug_uses_segmentation_class_aug(tmp_path):
    write_voc(tmp_path)
    ds = voc.build(tmp_path, "trainaug")
    assert len(ds) == 2
    aug = ds[1]
    assert aug["id"] == "2011_003276"
    assert set(aug["mask"].unique().tolist()) == {0, 12}
    assert (aug["label"].nonzero().flatten() + 1).tolist() == [12]


def test_roots_and_all_split(tmp_path):
    base = write_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        assert voc.detect(root)
        assert len(voc.build(root, "all")) == 3
    assert not voc.detect(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="split list not found"):
        voc.build(tmp_path, "trainval")


def test_rgb_rendered_masks_and_bad_ids(tmp_path):
    base = write_voc(tmp_path)
    path = base / "SegmentationClass" / "2007_000039.png"
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[:, 4:] = voc_color(7)  # car
    rgb[0, 0] = (224, 224, 192)  # void
    Image.fromarray(rgb).save(path)
    mask = voc.build(tmp_path, "val")[0]["mask"]
    assert int(mask[0, 0]) == 255 and int(mask[3, 5]) == 7 and int(mask[3, 1]) == 0
    Image.fromarray(np.full((6, 8), 21, dtype=np.uint8), mode="L").save(path)
    with pytest.raises(DataError, match="class id 21"):
        voc.build(tmp_path, "val")[0]


def test_unknown_xml_object_is_an_error(tmp_path):
    base = write_voc(tmp_path)
    (base / "Annotations" / "2007_000032.xml").write_text(_xml("2007_000032", ["unicorn"]))
    with pytest.raises(DataError, match="unicorn"):
        voc.build(tmp_path, "train")[0]


def test_patches_from_masks(tmp_path):
    write_voc(tmp_path)
    patches = voc.build(tmp_path, "train", labels_from_masks=True, patch_size=4)
    assert len(patches) == 4  # 2x2 grid of a 6x8 image (last row/column aligned to the border)
    assert torch.equal(patches[0]["label"], voc.VOC.label_from_mask(patches[0]["mask"]))
