"""Per-domain prompt files: schema, class coverage, lookup by loader class names."""

from __future__ import annotations

import warnings

import pytest

from wsss_domains.clip.prompt_files import clip_prompts_from_file, load_prompt_file, prompt_file_domains

EXPECTED = {
    ("voc", "voc"): 20,
    ("coco", "coco"): 80,
    ("driving", "cityscapes"): 19,
    ("driving", "camvid"): 12,  # 11 classes + unlabelled
    ("remote-sensing", "deepglobe"): 7,
    ("remote-sensing", "loveda"): 7,
    ("remote-sensing", "potsdam"): 6,
    ("remote-sensing", "vaihingen"): 6,
    ("remote-sensing", "dubai"): 6,
    ("remote-sensing", "isaid"): 15,
}


def test_every_domain_file_loads_and_is_well_formed():
    domains = prompt_file_domains()
    assert {"voc", "coco", "driving", "remote-sensing"} <= set(domains)
    for domain in domains:
        for name in load_prompt_file(domain)["datasets"]:
            prompts = clip_prompts_from_file(domain, name)
            assert prompts.templates and all(t.count("{}") == 1 for t in prompts.templates)
            assert prompts.background, f"{domain}/{name} needs a background vocabulary for CLIP-ES"
            assert all(names for names in prompts.class_names.values())


@pytest.mark.parametrize(("key", "count"), EXPECTED.items(), ids=[f"{d}-{n}" for d, n in EXPECTED])
def test_files_cover_their_classes(key, count):
    domain, dataset = key
    prompts = clip_prompts_from_file(domain, dataset)
    assert len(prompts.class_names) == count


def test_named_class_lists_are_covered():
    lists = {
        ("remote-sensing", "deepglobe"): "urban agriculture rangeland forest water barren unknown",
        ("remote-sensing", "loveda"): "background building road water barren forest agriculture",
        ("remote-sensing", "vaihingen"): "impervious_surface building low_vegetation tree car clutter",
        ("remote-sensing", "dubai"): "building land road vegetation water unlabeled",
        (
            "driving",
            "camvid",
        ): "Sky Building Pole Road Pavement Tree SignSymbol Fence Car Pedestrian Bicyclist",
    }
    for (domain, dataset), names in lists.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a class without prompt would warn
            prompts = clip_prompts_from_file(domain, dataset, names.split())
        assert list(prompts.class_names) == names.split()


def test_lookup_ignores_case_and_punctuation_and_keeps_loader_names():
    prompts = clip_prompts_from_file("driving", "CamVid", ["SignSymbol", "Pedestrian"])
    assert prompts.class_names["SignSymbol"] == ("traffic sign", "traffic light", "sign")
    voc = clip_prompts_from_file("voc", "VOC", ["person"], learned="ctx16")
    assert voc.class_names["person"] == ("person with clothes", "people", "human")
    assert voc.templates == ("a clean origami {}.",) and voc.learned == "ctx16"


def test_unknown_class_falls_back_to_its_name_with_a_warning():
    with pytest.warns(UserWarning, match="no prompt for hovercraft"):
        prompts = clip_prompts_from_file("coco", "coco", ["dog", "hovercraft"])
    assert prompts.class_names["hovercraft"] == ("hovercraft",)


def test_unknown_domain_or_dataset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no prompt file for domain 'mars'"):
        load_prompt_file("mars")
    with pytest.raises(KeyError, match="no dataset 'kitti'"):
        clip_prompts_from_file("driving", "kitti")


def test_histo_file_shares_templates_and_background():
    if "histo" not in prompt_file_domains():
        pytest.skip("prompts/histo/prompts.json not written yet")
    data = load_prompt_file("histo")
    for dataset in data["datasets"]:
        prompts = clip_prompts_from_file("histo", dataset)
        assert prompts.templates and prompts.background and prompts.class_names
