"""Name-based registry and the shared call signature."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from wsss_domains.refine import PixelAdaptiveRefiner, Refiner, create_refiner, list_refiners

HAS_CRF = find_spec("pydensecrf") is not None


def test_list_refiners():
    expected = ["par", "random-walk"] + (["crf"] if HAS_CRF else [])
    assert list_refiners() == sorted(expected)


def test_create_refiner_passes_parameters():
    par = create_refiner("par", num_iter=3, dilations=(1, 2))
    assert isinstance(par, PixelAdaptiveRefiner) and isinstance(par, Refiner)
    assert par.num_iter == 3 and par.dilations == (1, 2)


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="par"):
        create_refiner("nope")


@pytest.mark.parametrize("name", list_refiners())
@pytest.mark.parametrize("bg_threshold", [None, 0.5])
def test_common_signature(name, bg_threshold):
    image, cams = torch.rand(3, 24, 24), torch.rand(2, 24, 24)
    out = create_refiner(name)(image, cams, bg_threshold=bg_threshold)
    assert out.shape == ((2 if bg_threshold is None else 3), 24, 24)
    assert torch.isfinite(out).all() and (out >= 0).all()
