"""The one registry style: code registrations, lazy built-ins, and entry points of installed packages."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from wsss_domains.models.weights import PACKAGED_WEIGHTS, PackagedWeights, list_packaged_weights
from wsss_domains.refine import REFINERS, create_refiner, list_refiners
from wsss_domains.registry import BUILT_IN, RUNTIME, Registry
from wsss_domains.sam.registry import SAM_MODELS, SamSpec, list_sam_models, sam_spec

THIRD_PARTY = "third_party_wsss_extension"


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch) -> str:
    """An importable package, as an installed plugin would be, holding one extension of each kind."""
    package = tmp_path / THIRD_PARTY
    package.mkdir()
    (package / "__init__.py").write_text(
        "from wsss_domains.models.weights import PackagedWeights\n"
        "from wsss_domains.sam.registry import SamSpec\n\n"
        "class Halve:\n"
        "    name = 'halve'\n\n"
        "    def __init__(self, factor: float = 0.5):\n"
        "        self.factor = factor\n\n"
        "    def __call__(self, image, cams, bg_threshold=None):\n"
        "        return cams * self.factor\n\n"
        "TINY_SAM = SamSpec('tiny_sam', 'tiny.pth', 'a SAM of a third party')\n"
        "WEIGHTS = PackagedWeights('resnet10t', 'resnet10t-weights', 'resnet10t_weights', 'w-0a1b2c3d.pth')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield THIRD_PARTY
    sys.modules.pop(THIRD_PARTY, None)


def installed(registry: Registry, monkeypatch, **targets: str) -> None:
    """``registry`` sees ``targets`` (name -> "module:attribute") as installed entry points."""
    points = {name: EntryPoint(name, target, registry.group) for name, target in targets.items()}
    monkeypatch.setattr(registry, "entry_points", lambda: points)


def test_code_registrations_refuse_a_second_entry_under_a_taken_name():
    registry: Registry[int] = Registry("number", "test.numbers")
    assert registry.register("one", 1) == 1 and registry.register("one", 1) == 1  # the same entry again
    with pytest.raises(ValueError, match="number 'one' is already registered"):
        registry.register("one", 2)
    assert registry.register("one", 2, replace=True) == 2
    with pytest.raises(KeyError, match=r"unknown number 'two'; available: one"):
        registry.get("two")


def test_a_temporary_registration_restores_what_it_shadowed():
    registry: Registry[int] = Registry("number", "test.numbers")
    registry.register("one", 1)
    with registry.registered("one", 10), registry.registered("ten", 10):
        assert registry.get("one") == 10 and registry.source("ten") == RUNTIME
    assert registry.get("one") == 1 and registry.source("one") == BUILT_IN and registry.names() == ["one"]


def test_a_lazy_entry_is_imported_only_when_named(third_party):
    registry: Registry[type] = Registry("refiner", "test.refiners")
    registry.register_lazy("halve", f"{third_party}:Halve")
    assert "halve" in registry.names() and third_party not in sys.modules
    assert registry.get("halve").__name__ == "Halve" and third_party in sys.modules


def test_an_installed_refiner_is_listed_built_and_refreshed_away(third_party, monkeypatch):
    installed(REFINERS, monkeypatch, halve=f"{third_party}:Halve")
    try:
        assert "halve" in list_refiners() and third_party not in sys.modules  # listing imports nothing
        cams = torch.ones(2, 4, 4)
        assert torch.equal(create_refiner("halve", factor=0.25)(torch.rand(3, 4, 4), cams), cams / 4)
        assert REFINERS.source("halve") == f"{third_party}:Halve"
    finally:
        REFINERS.refresh()
    monkeypatch.undo()
    assert "halve" not in list_refiners() and "par" in list_refiners()


@pytest.mark.parametrize(
    ("registry", "name", "target", "error", "message"),
    [
        (REFINERS, "halve", "TINY_SAM", TypeError, "is not a class"),
        (REFINERS, "double", "Halve", ValueError, "class named 'halve'"),
        (SAM_MODELS, "tiny_sam", "Halve", TypeError, "not a SamSpec"),
        (SAM_MODELS, "big_sam", "TINY_SAM", ValueError, "names must agree"),
        (PACKAGED_WEIGHTS, "resnet10t", "TINY_SAM", TypeError, "not a PackagedWeights"),
        (PACKAGED_WEIGHTS, "resnet18", "WEIGHTS", ValueError, "names must agree"),
    ],
)
def test_a_broken_installed_extension_fails_when_named(
    third_party, monkeypatch, registry, name, target, error, message
):
    installed(registry, monkeypatch, **{name: f"{third_party}:{target}"})
    try:
        with pytest.raises(error, match=message):
            registry.get(name)
    finally:
        registry.refresh()


def test_installed_sam_specs_and_weights_join_the_built_in_ones(third_party, monkeypatch):
    installed(SAM_MODELS, monkeypatch, tiny_sam=f"{third_party}:TINY_SAM")
    installed(PACKAGED_WEIGHTS, monkeypatch, resnet10t=f"{third_party}:WEIGHTS")
    try:
        assert {"tiny_sam", "lite_medsam", "vit_b"} <= set(list_sam_models())
        assert isinstance(sam_spec("tiny_sam"), SamSpec) and sam_spec("tiny_sam").filename == "tiny.pth"
        assert {"resnet10t", "tf_efficientnet_lite0"} <= set(list_packaged_weights())
        entry = PACKAGED_WEIGHTS.get("resnet10t")
        assert isinstance(entry, PackagedWeights) and entry.sha256_prefix == "0a1b2c3d"
    finally:
        SAM_MODELS.refresh()
        PACKAGED_WEIGHTS.refresh()


def test_the_built_in_entries_are_imported_once_at_the_first_lookup():
    calls: list[int] = []

    def load() -> None:
        calls.append(1)
        registry.register("one", 1)

    registry: Registry[int] = Registry("number", "test.numbers", builtins=load)
    assert calls == []  # building the registry imports nothing
    assert registry.names() == ["one"] and registry.get("one") == 1 and "one" in registry
    assert calls == [1]


def test_importing_the_methods_package_imports_no_method_module():
    """Importing the package leaves SAM, CLIP and the method modules for the first lookup."""
    import subprocess

    code = (
        "import sys, wsss_domains.methods as m;"
        "print(sorted(k for k in sys.modules if k.startswith('wsss_domains.methods.')), 'segment_anything' in sys.modules);"
        "print(len(m.list_methods()) > 10, 'wsss_domains.methods.seam' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out[0] == "['wsss_domains.methods.base', 'wsss_domains.methods.registry'] False"
    assert out[1] == "True True"  # the first lookup imports the built-in methods
