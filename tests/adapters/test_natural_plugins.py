"""The voc and coco plugins: registry, protocol defaults, and smoke tests on the real samples."""

from __future__ import annotations

import warnings

import pytest
import torch
from wsss_adapters.natural import CocoDomain, VocDomain, plugins

from wsss_domains.clip.prompt_files import prompt_file_domains
from wsss_domains.domains import create_domain
from wsss_domains.domains.contract import BackgroundMode


@pytest.mark.parametrize(("name", "loader", "classes"), [("voc", "voc2012", 21), ("coco", "coco", 81)])
def test_registered_threshold_domains(name, loader, classes):
    domain = create_domain(name)
    spec = domain.dataset(loader)
    assert spec.label_space.num_classes == classes
    assert spec.label_space.background_mode is BackgroundMode.THRESHOLD
    assert spec.label_space.background_index == 0
    assert domain.background_threshold(spec.label_space) == type(domain).BACKGROUND_THRESHOLD
    prompts = domain.clip_prompts(spec.label_space)
    assert len(prompts.class_names) == classes - 1 and prompts.background


def test_protocol_is_documented_and_threshold_fixed():
    for cls in (VocDomain, CocoDomain):
        assert "never chosen on the split being scored" in (cls.__doc__ or "")
        assert 0.2 <= cls.BACKGROUND_THRESHOLD <= 0.4
    assert create_domain("coco").dataset("coco").splits == ("train2017", "val2017", "train2014", "val2014")


def test_prompts_without_the_prompt_file(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("no prompt file")

    monkeypatch.setattr(plugins, "clip_prompts_from_file", missing)
    space = VocDomain().dataset("voc2012").label_space
    prompts = VocDomain().clip_prompts(space)
    assert prompts.class_names["tvmonitor"][0] == "tv monitor"
    assert prompts.class_names["cat"] == ("cat",) and "sky" in prompts.background


@pytest.mark.parametrize(("name", "loader"), [("voc", "voc2012"), ("coco", "coco")])
def test_prompt_files_cover_every_class(name, loader):
    if name not in prompt_file_domains():
        pytest.skip(f"prompts/{name}/prompts.json not present")
    domain = create_domain(name)
    space = domain.dataset(loader).label_space
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class missing from the file warns
        prompts = domain.clip_prompts(space)
    assert set(prompts.class_names) == set(space.foreground_names)


@pytest.mark.realdata
def test_real_voc_sample(shared_data):
    root = shared_data / "natural" / "voc-sample"
    domain = create_domain("voc")
    spec = domain.detect_dataset(root)
    ds = spec.build(root, "all")
    assert len(ds) == 1
    sample = ds[0]
    assert sample["image"].shape == (3, 375, 500) and sample["mask"].shape == (375, 500)
    assert set(sample["mask"].unique().tolist()) <= set(range(21)) | {255}
    assert torch.equal(sample["label"], spec.label_space.label_from_mask(sample["mask"]))
    assert sample["label"].sum() >= 1


@pytest.mark.realdata
def test_real_coco128(shared_data):
    root = shared_data / "natural" / "coco128"
    domain = create_domain("coco")
    spec = domain.detect_dataset(root)
    ds = spec.build(root, "train2017")
    assert len(ds) == 64
    for i in (0, 31, 63):
        sample = ds[i]
        h, w = sample["mask"].shape
        assert sample["image"].shape == (3, h, w)
        assert set(sample["mask"].unique().tolist()) <= set(range(81))  # coco128 has no crowd regions
        # every annotated category shows up in the rasterised mask on these images
        assert torch.equal(sample["label"], spec.label_space.label_from_mask(sample["mask"]))
        assert sample["label"].sum() >= 1
