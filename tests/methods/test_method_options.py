"""Method options: the constructor's typed keyword parameters; unknown or ill-typed ones fail by name."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pytest

from wsss_domains.cli import main
from wsss_domains.methods import create_method, list_methods, method_class
from wsss_domains.methods.base import Method
from wsss_domains.options import MethodOptionError, convert


class Forwarding(Method):
    """A base taking options of its own and forwarding the rest, as PPC forwards to SEAM."""

    name = "test-forwarding"

    def __init__(self, alpha: float = 0.5, sizes: Sequence[int] = (1, 2), **rest: Any) -> None:
        super().__init__(alpha=alpha, sizes=list(sizes), **rest)


class Leaf(Forwarding):
    name = "test-leaf"

    def __init__(self, mode: str | None = None, **base: Any) -> None:
        super().__init__(mode=mode, **base)


def test_options_are_the_constructor_parameters_up_the_forwarding_chain():
    specs = Leaf.option_specs()
    assert list(specs) == ["mode", "alpha", "sizes"]
    assert specs["alpha"].default == 0.5
    assert Method.option_specs() == {}


def test_values_are_converted_to_the_declared_types():
    assert Leaf.checked_options({"alpha": 1, "sizes": [3, 4.0], "mode": None}) == {
        "alpha": 1.0,
        "sizes": [3, 4],
        "mode": None,
    }
    assert isinstance(Leaf.checked_options({"alpha": 1})["alpha"], float)
    assert convert([1, 2], tuple[int, int]) == (1, 2)
    assert convert(3, int | str) == 3 and convert("4,8", int | str) == "4,8"
    with pytest.raises(ValueError):
        convert([1, 2, 3], tuple[int, int])
    for value, annotation in (
        (True, int),
        (1.5, int),
        ("x", float),
        (1, str),
        ("a", Sequence[int]),
        (1, bool),
    ):
        with pytest.raises(TypeError):
            convert(value, annotation)


def test_an_unknown_option_names_the_method_and_the_options_it_knows():
    with pytest.raises(MethodOptionError) as error:
        Leaf.checked_options({"alpah": 0.1})
    message = str(error.value)
    assert "'test-leaf' has no option 'alpah'" in message
    assert "alpha (float, default 0.5)" in message and "mode (str | None, default None)" in message
    with pytest.raises(MethodOptionError, match="option 'alpha' expects float, got 'high'"):
        Leaf.checked_options({"alpha": "high"})


def test_registered_methods_refuse_misspelt_options():
    with pytest.raises(MethodOptionError, match="'cam-proto' has no option 'fuse_wieght'.*fuse_weight"):
        create_method("cam-proto", fuse_wieght=0.7)
    with pytest.raises(MethodOptionError, match="'cam' has no option 'stage'; its options: none"):
        create_method("cam", stage=3)
    assert create_method("cam-proto", fuse_weight=1).fuse_weight == 1.0
    assert create_method("label-probe", stride=[4, 8], grid=16).strides == (4, 8)
    assert create_method("seed-probe", fit_images=7).fit_images == 7


def test_chain_options_are_scoped_by_part_and_checked_per_part():
    specs = method_class("cam-proto+par").option_specs()
    assert "cam-proto.fuse_weight" in specs
    chain = create_method("cam-proto+par", **{"cam-proto.fuse_weight": 0.25})
    assert chain.methods[0].fuse_weight == 0.25
    with pytest.raises(MethodOptionError, match="'cam-proto' has no option 'fuse'"):
        create_method("cam-proto+par", **{"cam-proto.fuse": 0.25})


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_builds_from_its_declared_defaults(name):
    """Each declared option, passed explicitly at its default, is accepted (no signature drift)."""
    cls = method_class(name)
    given = {
        key: spec.default
        for key, spec in cls.option_specs().items()
        if spec.default is not inspect.Parameter.empty and key != "sam"
    }
    assert isinstance(create_method(name, **given), Method)


def test_methods_details_lists_each_method_options_with_types_and_defaults(capsys):
    assert main(["methods", "--details"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("cam-proto") :]
    assert "fuse_weight (float, default 0.5)" in block[: block.index("\n\n")]
    assert "options: none" in out[out.index("cam\n") : out.index("cam-proto")]


def test_a_method_installed_through_an_entry_point_is_listed_and_built(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from wsss_domains.methods import registry

    installed = EntryPoint(name="test-leaf", value=f"{__name__}:Leaf", group=registry.ENTRY_POINT_GROUP)
    wrong = EntryPoint(name="test-misnamed", value=f"{__name__}:Leaf", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        registry.METHODS, "entry_points", lambda: {"test-leaf": installed, "test-misnamed": wrong}
    )
    try:
        assert {"test-leaf", "test-misnamed"} <= set(list_methods())
        method = create_method("test-leaf", alpha=2)
        assert type(method) is Leaf and method.options["alpha"] == 2.0
        assert registry.METHODS.source("test-leaf") == f"{__name__}:Leaf"
        assert main(["methods"]) == 0
        listed = capsys.readouterr().out
        assert f"[{__name__}:Leaf]" in listed and "[built in]" not in listed  # an installed one's origin
        assert "test-misnamed" in listed and "failed to load (ValueError" in listed  # listed, not fatal
        with pytest.raises(ValueError, match="names must agree"):
            method_class("test-misnamed")
    finally:
        registry.METHODS.refresh()  # forget what the fake entry point loaded
