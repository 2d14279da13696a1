"""The driving plugin: registry, detection, hooks, and smoke tests on the real development data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from wsss_adapters.driving import prompts as prompts_module
from wsss_adapters.driving.labels import CAMVID, CITYSCAPES, label_ids_to_train_ids

from wsss_domains.clip.prompt_files import prompt_file_domains
from wsss_domains.data.io import read_index_mask
from wsss_domains.domains import create_domain
from wsss_domains.domains.contract import BackgroundMode, ClipPrompts, PromptKind


def test_registered_with_both_datasets():
    domain = create_domain("driving")
    assert set(domain.datasets()) == {"cityscapes", "camvid"}
    assert domain.dataset("camvid").patch_size == (120, 160)
    for spec in domain.datasets().values():
        assert spec.label_space.background_mode is BackgroundMode.NONE
        assert spec.splits == ("train", "val", "test")


def test_detects_each_layout(tmp_path):
    domain = create_domain("driving")
    (tmp_path / "cs" / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "cv" / "valannot").mkdir(parents=True)
    (tmp_path / "cv" / "val.txt").write_text("")
    assert domain.detect_dataset(tmp_path / "cs").name == "cityscapes"
    assert domain.detect_dataset(tmp_path / "cv").name == "camvid"
    with pytest.raises(ValueError, match="no 'driving' dataset layout"):
        domain.detect_dataset(tmp_path)


def test_prompts_fall_back_to_readable_class_names(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("no prompt file")

    monkeypatch.setattr(prompts_module, "clip_prompts_from_file", missing)
    prompts = create_domain("driving").clip_prompts(CAMVID)
    assert set(prompts.class_names) == set(CAMVID.classes)
    assert prompts.class_names["SignSymbol"][0] == "traffic sign"
    assert prompts.class_names["Car"] == ("car",)


@pytest.mark.parametrize("space", [CITYSCAPES, CAMVID], ids=["cityscapes", "camvid"])
def test_prompts_from_the_packaged_file(space, monkeypatch):
    calls = []

    def from_file(domain, dataset, class_names):
        calls.append((domain, dataset, tuple(class_names)))
        return ClipPrompts(class_names={c: (c,) for c in class_names}, templates=("a street with {}.",))

    monkeypatch.setattr(prompts_module, "clip_prompts_from_file", from_file)
    prompts = create_domain("driving").clip_prompts(space)
    assert calls == [("driving", "camvid" if space is CAMVID else "cityscapes", space.foreground_names)]
    assert tuple(prompts.templates) == ("a street with {}.",)


def test_prompt_file_covers_every_class():
    if not prompt_file_domains() or "driving" not in prompt_file_domains():
        pytest.skip("prompts/driving/prompts.json not present")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class missing from the file warns
        for space in (CITYSCAPES, CAMVID):
            prompts = create_domain("driving").clip_prompts(space)
            assert set(prompts.class_names) == set(space.foreground_names)


def test_sam_uses_point_prompts():
    assert create_domain("driving").sam_strategy().prompt is PromptKind.POINTS


@pytest.mark.realdata
def test_real_camvid(shared_data):
    root = shared_data / "driving" / "CamVid"
    domain = create_domain("driving")
    spec = domain.detect_dataset(root)
    assert spec.name == "camvid"
    train = spec.build(root, "train")
    val = spec.build(root, "val")
    assert (len(train), len(val)) == (367, 101)
    sample = val[0]
    assert sample["image"].shape == (3, 360, 480)
    raw = read_index_mask(root / "valannot" / f"{sample['id']}.png")
    assert torch.equal(sample["mask"] == 255, raw == 11)
    assert set(sample["mask"].unique().tolist()) <= set(range(11)) | {255}
    crops = spec.build(root, "val", labels_from_masks=True)
    assert 9 * 90 <= len(crops) <= 9 * 101  # a few crops may be entirely Unlabelled
    first = crops[0]
    assert first["image"].shape == (3, 120, 160) and first["meta"]["parent"] == sample["id"]
    assert torch.equal(first["mask"], sample["mask"][:120, :160])
    # crops carry far fewer classes than whole frames: the point of the protocol
    crop_classes = sum(float(label.sum()) for *_, label in crops.index) / len(crops)
    assert crop_classes < float(sample["label"].sum())
    assert crop_classes < 6


@pytest.mark.realdata
def test_real_cityscapes_sample(shared_data):
    root = shared_data / "driving" / "cityscapes-sample"
    spec = create_domain("driving").detect_dataset(root)
    assert spec.name == "cityscapes"
    (sample,) = [spec.build(root, "val")[0]]
    assert sample["id"] == "frankfurt_000000_000294" and sample["image"].shape == (3, 128, 256)
    derived = spec.build(root, "val", label_source="labelIds")[0]["mask"]
    stored = torch.from_numpy(
        np.array(Image.open(next((root / "gtFine" / "val" / "frankfurt").glob("*_labelTrainIds.png"))))
    ).long()
    assert torch.equal(sample["mask"], stored)
    # the sample was downscaled file by file, so the two agree on nearly every pixel
    assert float((derived == stored).float().mean()) > 0.99
    label_ids = read_index_mask(next((root / "gtFine" / "val" / "frankfurt").glob("*_labelIds.png")))
    assert torch.equal(derived, label_ids_to_train_ids(label_ids))
