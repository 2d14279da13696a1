"""Class-aware attention affinity: Sinkhorn normalisation, official box masks, refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_domains.clip.caa import box_mask, caa_refine, sinkhorn_affinity


def test_sinkhorn_affinity_is_symmetric_and_near_doubly_stochastic():
    attn = torch.rand(36, 36).pow(4).softmax(dim=-1)
    affinity = sinkhorn_affinity(attn)
    assert affinity.shape == (36, 36)
    assert torch.allclose(affinity, affinity.T, atol=1e-6)
    assert (affinity >= 0).all()
    assert torch.allclose(affinity.sum(dim=1), torch.ones(36), atol=1e-3)
    assert torch.allclose(affinity.sum(dim=0), torch.ones(36), atol=1e-3)


def test_identity_attention_refines_to_the_cam_inside_its_boxes():
    cam = torch.zeros(1, 6, 6)
    cam[0, 1:3, 1:4] = torch.tensor([[0.5, 1.0, 0.5], [0.6, 0.9, 0.2]])
    cam[0, 5, 5] = 0.1  # below 0.4 x max: outside every box
    refined = caa_refine(cam, sinkhorn_affinity(torch.eye(36)))
    expected = cam.clone()
    expected[0, 5, 5] = 0
    assert refined.shape == (1, 6, 6)
    assert torch.allclose(refined, expected, atol=1e-6)


def test_only_in_box_activation_is_propagated():
    cam = torch.zeros(2, 5, 5)
    cam[0, 0:2, 0:2] = 1.0
    cam[0, 4, 0] = 0.3  # below 0.4 x max: no box, so it must not contribute
    cam[1, 1:4, 1:4] = 0.5
    uniform = torch.full((25, 25), 1 / 25)
    refined = caa_refine(cam, sinkhorn_affinity(uniform))
    # a uniform affinity spreads each class's in-box mass evenly over the image
    assert torch.allclose(refined[0], torch.full((5, 5), 4 / 25), atol=1e-6)
    assert torch.allclose(refined[1], torch.full((5, 5), 9 * 0.5 / 25), atol=1e-6)


def test_box_mask_clips_box_ends_like_the_official_code():
    cam = torch.zeros(5, 5)
    cam[3:5, 3:5] = 1.0  # region touching the bottom-right edge
    mask = box_mask(cam)
    assert mask[3, 3] and mask.sum() == 1  # official box end min(x+w, W-1) drops the last row/column
    assert not box_mask(torch.zeros(4, 4)).any()


def _official_boxes(cam: np.ndarray, threshold: float) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    h, w = cam.shape
    u8 = np.expand_dims((cam * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(u8, int(threshold * np.max(u8)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    mask = np.zeros((h, w), bool)
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        mask[y : min(y + bh, h - 1), x : min(x + bw, w - 1)] = True
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_box_mask_matches_opencv_contours(seed):
    gen = torch.Generator().manual_seed(seed)
    cam = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 18, 22, generator=gen), 3, 1, 1)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    for threshold in (0.4, 0.6, 0.8):
        expected = _official_boxes(cam.numpy().astype(np.float32), threshold)
        assert np.array_equal(box_mask(cam, threshold).numpy(), expected)
