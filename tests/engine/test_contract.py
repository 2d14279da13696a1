"""The domain-plugin contract (LabelSpace, DomainPlugin helpers) and the plugin registry."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path

import fakes
import numpy as np
import pytest
import torch
from PIL import Image

from wsss_domains.domains import (
    ENTRY_POINT_GROUP,
    BackgroundMode,
    DatasetSpec,
    DomainPlugin,
    LabelSpace,
    create_domain,
    list_domains,
    register_domain,
)
from wsss_domains.domains import registry as registry_module

RGB3 = ((10, 20, 30), (40, 50, 60), (70, 80, 90))


# -- LabelSpace ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ("a", "b"), "palette": RGB3}, "palette has 3 colours for 2 classes"),
        (
            {"classes": ("a", "b", "c"), "palette": RGB3, "background_mode": BackgroundMode.THRESHOLD},
            "needs a background_index",
        ),
        (
            {"classes": ("a", "b", "c"), "palette": RGB3, "background_index": 3},
            "background_index 3 out of range",
        ),
        (
            {"classes": ("a", "b", "c"), "palette": RGB3, "background_index": -1},
            "background_index -1 out of range",
        ),
        ({"classes": ("a", "b", "c"), "palette": RGB3, "ignore_index": 2}, "ignore_index"),
        ({"classes": ("a", "b", "c"), "palette": RGB3, "ignore_index": 256}, "ignore_index"),
    ],
)
def test_label_space_rejects_inconsistent_declarations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LabelSpace(**kwargs)


def test_label_space_accepts_ignore_index_just_above_the_classes():
    space = LabelSpace(classes=("a", "b", "c"), palette=RGB3, ignore_index=3)
    assert space.ignore_index == 3 and space.num_classes == 3


def test_foreground_without_background_is_every_class():
    space = LabelSpace(classes=("a", "b", "c"), palette=RGB3)
    assert space.foreground == (0, 1, 2)
    assert space.foreground_names == ("a", "b", "c")


def test_foreground_skips_the_background_class_wherever_it_sits():
    space = LabelSpace(
        classes=("a", "bg", "c"), palette=RGB3, background_mode=BackgroundMode.THRESHOLD, background_index=1
    )
    assert space.foreground == (0, 2)
    assert space.foreground_names == ("a", "c")


def test_label_from_mask_is_multi_hot_over_foreground_and_ignores_ignore_pixels():
    space = LabelSpace(
        classes=("bg", "b", "c"), palette=RGB3, background_mode=BackgroundMode.THRESHOLD, background_index=0
    )
    mask = torch.tensor([[0, 0, 2], [2, 255, 255]])
    assert space.label_from_mask(mask).tolist() == [0.0, 1.0]  # over (b, c): background is not a label
    # class 1 only under the ignore index does not count
    assert space.label_from_mask(torch.tensor([[255, 2], [0, 0]])).tolist() == [0.0, 1.0]
    assert space.label_from_mask(torch.tensor([[1, 2], [2, 2]]), min_pixels=2).tolist() == [0.0, 1.0]
    assert space.label_from_mask(torch.full((2, 2), 255)).tolist() == [0.0, 0.0]


def test_label_from_mask_without_background_counts_every_class():
    space = LabelSpace(classes=("a", "b", "c"), palette=RGB3)
    assert space.label_from_mask(torch.tensor([[0, 2], [2, 0]])).tolist() == [1.0, 0.0, 1.0]


def test_label_from_mask_names_an_unknown_class_id():
    space = LabelSpace(classes=("a", "b", "c"), palette=RGB3)
    with pytest.raises(ValueError, match=r"class id 7, outside 0\.\.2"):
        space.label_from_mask(torch.tensor([[0, 7], [1, 7]]))


def test_flat_palette_places_class_colours_and_the_ignore_colour():
    space = LabelSpace(classes=("a", "b", "c"), palette=RGB3, ignore_index=200, ignore_color=(1, 2, 3))
    pal = space.flat_palette()
    assert len(pal) == 768
    assert pal[:9] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert pal[600:603] == [1, 2, 3]
    assert set(pal[9:600]) == {0} and set(pal[603:]) == {0}


def test_flat_palette_round_trips_through_a_palette_png(tmp_path: Path):
    space = fakes.LABEL_SPACE
    ids = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    image = Image.fromarray(ids, mode="P")
    image.putpalette(space.flat_palette())
    image.save(tmp_path / "m.png")
    rgb = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    assert [tuple(v) for v in rgb.reshape(-1, 3)] == [*space.palette, space.ignore_color]


# -- DomainPlugin helpers --------------------------------------------------------------------


def _spec(name: str, detect: bool) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        label_space=fakes.LABEL_SPACE,
        build=lambda root, split, **_: [],
        detect=lambda root: detect,
        splits=("train",),
    )


class TwoLoaders(DomainPlugin):
    name = "two-loaders"

    def __init__(self, hits: tuple[bool, bool] = (False, False)) -> None:
        self.hits = hits

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {"alpha": _spec("alpha", self.hits[0]), "beta": _spec("beta", self.hits[1])}


def test_detect_dataset_returns_the_single_match(tmp_path: Path):
    assert TwoLoaders((False, True)).detect_dataset(tmp_path).name == "beta"


def test_detect_dataset_none_recognised_lists_loaders_and_asks_for_dataset(tmp_path: Path):
    with pytest.raises(
        ValueError, match=r"no 'two-loaders' dataset layout recognised \(known: alpha, beta\).*--dataset"
    ):
        TwoLoaders((False, False)).detect_dataset(tmp_path)


def test_detect_dataset_ambiguous_names_the_candidates(tmp_path: Path):
    with pytest.raises(ValueError, match=r"ambiguous between alpha, beta; pass --dataset"):
        TwoLoaders((True, True)).detect_dataset(tmp_path)


def test_detect_dataset_missing_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TwoLoaders((True, False)).detect_dataset(tmp_path / "nope")


def test_dataset_by_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="has no dataset 'gamma'; known: alpha, beta"):
        TwoLoaders().dataset("gamma")


def test_label_space_for_reads_a_declared_label_space(tmp_path: Path):
    declared = fakes.DECLARED_SPEC
    assert declared.label_space.classes != fakes.LABEL_SPACE.classes  # only a placeholder
    (tmp_path / fakes.CLASS_FILE).write_text("background red\n")
    assert declared.label_space_for(tmp_path).classes == ("background", "red")
    fakes.write_shapes(tmp_path / "data", 1, 1, 0, declared=True)
    assert declared.label_space_for(tmp_path / "data") == fakes.LABEL_SPACE
    assert fakes.SPEC.label_space_for(tmp_path) is fakes.LABEL_SPACE


# -- registry --------------------------------------------------------------------------------


def test_entry_points_list_the_histo_plugin_with_its_loaders():
    assert "histo" in list_domains()
    histo = create_domain("histo")
    assert histo.name == "histo"
    assert {"wsss4luad", "glas"} <= set(histo.datasets())


def test_unknown_domain_names_the_installed_ones():
    with pytest.raises(KeyError, match=r"unknown domain 'no-such-domain'; available: .*histo"):
        create_domain("no-such-domain")


def test_runtime_registration_is_listed_and_instantiated():
    assert fakes.FAKE_DOMAIN not in list_domains()
    try:
        assert register_domain(fakes.FakeDomain) is fakes.FakeDomain  # usable as a decorator
        assert fakes.FAKE_DOMAIN in list_domains()
        plugin = create_domain(fakes.FAKE_DOMAIN)
        assert isinstance(plugin, fakes.FakeDomain)
        assert plugin is not create_domain(fakes.FAKE_DOMAIN)  # a fresh instance per call
    finally:
        fakes.unregister()
    assert fakes.FAKE_DOMAIN not in list_domains()


class NotAPlugin:
    name = "bogus"


@pytest.mark.parametrize(
    ("ep_name", "target", "message"),
    [
        ("bogus", "test_contract:NotAPlugin", "does not point to a DomainPlugin subclass"),
        ("renamed", "fakes:FakeDomain", "loads a plugin named 'fake'"),
    ],
)
def test_broken_entry_points_are_refused(monkeypatch, ep_name, target, message):
    eps = {ep_name: EntryPoint(ep_name, target, ENTRY_POINT_GROUP)}
    monkeypatch.setattr(registry_module.DOMAINS, "entry_points", lambda: eps)
    with pytest.raises(TypeError, match=message):
        create_domain(ep_name)


def test_every_built_in_recipe_names_registered_methods_and_valid_cam_settings():
    """`run` follows a recipe blindly: a typo in a method name or a scale out of range would fail
    only after the classifier's training."""
    from wsss_domains.cam.settings import CamSettings
    from wsss_domains.domains import create_domain
    from wsss_domains.methods.registry import create_method

    for domain in ("histo", "remote-sensing", "driving"):
        plugin = create_domain(domain)
        for dataset in plugin.datasets():
            recipe = plugin.recipe(dataset)
            create_method(recipe.method, **recipe.method_options)
            CamSettings(scales=recipe.cam_scales or (1.0,), cam_norm=recipe.cam_norm)
            assert recipe.classifier_balance is None or recipe.classifier_balance > 0
