"""SAM-derived prototypes on hand-made features."""

from __future__ import annotations

import pytest
import torch

from wsss_domains.sam.prototypes import (
    class_prototypes,
    fuse_cams,
    prototype_cams,
    segment_prototypes,
)


def _features() -> torch.Tensor:
    """1 x 2 x 4 x 4: left half points along (1, 0), right half along (0, 2)."""
    f = torch.zeros(1, 2, 4, 4)
    f[0, 0, :, :2] = 1.0
    f[0, 1, :, 2:] = 2.0
    return f


def test_masked_average_pooling_at_feature_resolution():
    masks = torch.zeros(1, 3, 8, 8, dtype=torch.bool)  # image at twice the feature size
    masks[0, 0, :, :4] = True  # left half -> (1, 0)
    masks[0, 1, :, 2:6] = True  # straddles: half its cells left, half right -> (0.5, 1)
    protos, valid = segment_prototypes(_features(), masks)
    assert torch.allclose(protos[0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(protos[0, 1], torch.tensor([0.5, 1.0]))
    assert valid.tolist() == [[True, True, False]] and protos[0, 2].abs().sum() == 0


def test_partial_cell_coverage_weights_the_average():
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 0:2, 2:4] = True  # one whole left cell (feature cell (0, 1))
    masks[0, 0, 0, 4] = True  # a quarter of a right cell (0, 2)
    protos, _ = segment_prototypes(_features(), masks)
    # weights 1 and 0.25: (1 * (1, 0) + 0.25 * (0, 2)) / 1.25
    assert torch.allclose(protos[0, 0], torch.tensor([0.8, 0.4]))


def test_class_prototypes_pool_the_union_of_a_class_segments():
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, :, :2] = True  # class 1
    masks[0, 1, :2, :2] = True  # class 1 again, inside segment 0: counted once
    masks[0, 2, :, 2:] = True  # unlabelled
    classes = torch.tensor([[1, 1, -1]])
    protos, valid = class_prototypes(_features(), masks, classes, num_classes=3)
    assert torch.allclose(protos[0, 1], torch.tensor([1.0, 0.0]))
    assert valid.tolist() == [[False, True, False]]
    classes = torch.tensor([[1, 2, 2]])  # now class 2 = top-left cells + right half: 4 + 8 cells
    protos, _ = class_prototypes(_features(), masks, classes, num_classes=3)
    assert torch.allclose(protos[0, 2], torch.tensor([4 / 12, 16 / 12]))
    with pytest.raises(ValueError, match="does not match"):
        class_prototypes(_features(), masks, torch.tensor([[1, 2]]), num_classes=3)


def test_prototype_cams_are_relu_cosine_over_max():
    features = _features()
    features[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # 45 degrees: cosine 0.707 to both
    features[0, :, 3, 3] = torch.tensor([-1.0, 0.0])  # opposite of prototype 0: ReLU -> 0
    protos = torch.tensor([[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    cams = prototype_cams(features, protos, valid=torch.tensor([True, True, False]))
    assert cams.shape == (1, 3, 4, 4)
    assert torch.allclose(cams[0, 0, 1, 0], torch.tensor(1.0))
    assert torch.allclose(cams[0, 0, 0, 0], torch.tensor(2**-0.5))
    assert cams[0, 0, 3, 3] == 0 and cams[0, 0, :, 2].abs().sum() == 0
    assert torch.allclose(cams[0, 1, 0, 3], torch.tensor(1.0))
    assert cams[0, 2].abs().sum() == 0  # invalid prototype
    per_image = prototype_cams(features, protos[None], valid=torch.tensor([[True, True, False]]))
    assert torch.equal(per_image, cams)


def test_fuse_is_the_weighted_mean_at_the_cam_size():
    cams = torch.zeros(1, 2, 8, 8)
    cams[0, 0, :, :4] = 1.0
    proto = torch.zeros(1, 2, 4, 4)
    proto[0, 0] = 1.0
    fused = fuse_cams(cams, proto)
    assert fused.shape == cams.shape
    assert torch.allclose(fused[0, 0, :, :4], torch.ones(8, 4))
    assert torch.allclose(fused[0, 0, :, 4:], torch.full((8, 4), 0.5))
    assert torch.equal(fuse_cams(cams, proto, weight=0.0), cams)
    with pytest.raises(ValueError, match="weight"):
        fuse_cams(cams, proto, weight=1.5)
