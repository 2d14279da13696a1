"""Constant background channel and ToCo's two-threshold label rule."""

from __future__ import annotations

import pytest
import torch

from wsss_domains.refine.background import add_background, dual_threshold_labels
from wsss_domains.refine.par import PixelAdaptiveRefiner


def test_add_background_prepends_constant_channel():
    cams = torch.rand(2, 4, 5)
    out = add_background(cams, 0.3)
    assert out.shape == (3, 4, 5)
    assert torch.equal(out[0], torch.full((4, 5), 0.3))
    assert torch.equal(out[1:], cams)
    assert add_background(torch.rand(2, 3, 4, 5), 0.7).shape == (2, 4, 4, 5)


class _NoRefinement:
    """Background padding only, so the label rule can be checked on known scores."""

    name = "none"

    def __call__(self, image, cams, bg_threshold=None):
        return cams if bg_threshold is None else add_background(cams, bg_threshold)


def test_dual_threshold_rule_matches_toco():
    cams = torch.tensor([[[0.9, 0.5, 0.1]], [[0.2, 0.6, 0.05]]])  # 2 classes, 1x3 image
    label = dual_threshold_labels(_NoRefinement(), torch.rand(3, 1, 3), cams, low=0.25, high=0.7)
    # 0.9 beats both thresholds -> class 1; 0.6 beats only the low one -> ignore; 0.1 -> background.
    assert label.tolist() == [[1, 255, 0]]
    assert label.dtype == torch.int64


def test_dual_threshold_with_par_on_edge_scene():
    image = torch.zeros(3, 12, 24)
    image[:, :, 12:] = 1.0
    cam = torch.zeros(1, 12, 24)
    cam[:, :, :12] = 1.0
    cam[:, :, 12:14] = 0.8
    label = dual_threshold_labels(PixelAdaptiveRefiner(), image, cam)
    assert (label[:, :12] == 1).all() and (label[:, 12:] == 0).all()


def test_dual_threshold_rejects_bad_arguments():
    with pytest.raises(ValueError, match="below"):
        dual_threshold_labels(_NoRefinement(), torch.rand(3, 2, 2), torch.rand(1, 2, 2), low=0.7, high=0.2)
    with pytest.raises(ValueError, match="collides"):
        dual_threshold_labels(_NoRefinement(), torch.rand(3, 2, 2), torch.rand(2, 2, 2), ignore_index=2)
