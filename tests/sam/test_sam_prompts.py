"""Prompts from synthetic CAMs: connected components, region boxes, peak points, point grids."""

from __future__ import annotations

import numpy as np
import torch

from wsss_domains.sam.predictor import CachedSamPredictor
from wsss_domains.sam.prompts import cam_boxes, cam_peaks, connected_components, everything_masks


def _same_partition(labels: torch.Tensor, expected: np.ndarray) -> bool:
    """Equal up to renumbering, background 0 in both."""
    pairs = {
        (int(a), int(b)) for a, b in zip(labels.flatten().tolist(), expected.flatten().tolist(), strict=True)
    }
    lefts = [a for a, _ in pairs]
    rights = [b for _, b in pairs]
    return len(set(lefts)) == len(pairs) == len(set(rights)) and (0, 0) in pairs


def test_components_8_connected():
    grid = np.array(
        [
            [1, 1, 0, 0, 0, 2],
            [0, 1, 0, 0, 2, 0],  # the diagonal joins the 2s
            [0, 0, 0, 0, 0, 0],
            [3, 0, 4, 4, 4, 0],
            [3, 0, 0, 0, 4, 0],
        ]
    )
    labels = connected_components(torch.from_numpy(grid > 0))
    assert int(labels.max()) == 4
    assert _same_partition(labels, grid)
    assert connected_components(torch.zeros(3, 3, dtype=torch.bool)).sum() == 0


def test_components_of_a_long_spiral_are_one():
    size = 31
    spiral = np.zeros((size, size), dtype=bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:  # a one-pixel-wide spiral corridor, walls two apart
        spiral[top, left : right + 1] = True
        spiral[top : bottom + 1, right] = True
        spiral[bottom, left : right + 1] = True
        spiral[top + 2 : bottom + 1, left] = True
        if top + 2 <= bottom:
            spiral[top + 2, left : right - 1] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    labels = connected_components(torch.from_numpy(spiral))
    assert int(labels.max()) == 1 and bool((labels > 0).eq(torch.from_numpy(spiral)).all())


def test_boxes_from_largest_regions_first():
    cam = torch.zeros(40, 50)
    cam[5:15, 10:30] = 1.0  # 10 x 20 = 200 px
    cam[25:35, 2:8] = 0.8  # 60 px
    cam[30:32, 40:42] = 0.9  # 4 px
    cam[20, 45] = 0.4  # below half of the max: no region
    boxes = cam_boxes(cam, cam_threshold=0.5, max_boxes=4)
    assert boxes.tolist() == [[10, 5, 30, 15], [2, 25, 8, 35], [40, 30, 42, 32]]
    assert cam_boxes(cam, 0.5, max_boxes=2).shape == (2, 4)
    assert cam_boxes(cam, 0.5, max_boxes=4, min_area=10).shape == (2, 4)
    assert cam_boxes(cam, 0.85, max_boxes=4).tolist() == [[10, 5, 30, 15], [40, 30, 42, 32]]
    assert cam_boxes(torch.zeros(8, 8), 0.5, 4).shape == (0, 4)


def _bump(h: int, w: int, y: float, x: float, sigma: float, height: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return height * torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def test_peaks_global_max_first_threshold_and_spacing():
    cam = _bump(48, 64, 10, 12, 3, 1.0) + _bump(48, 64, 30, 50, 3, 0.8) + _bump(48, 64, 40, 10, 3, 0.5)
    points = cam_peaks(cam, peak_threshold=0.7, min_distance=5, max_points=4)
    assert points.tolist() == [[12.5, 10.5], [50.5, 30.5]]  # (x, y) pixel centres; 0.5 bump dropped
    assert cam_peaks(cam, 0.4, 5, 4).shape == (3, 2)
    assert cam_peaks(cam, 0.4, 5, 1).tolist() == [[12.5, 10.5]]
    assert cam_peaks(torch.zeros(5, 5), 0.5, 2, 3).shape == (0, 2)


def test_peaks_on_a_plateau_keep_their_distance():
    cam = torch.zeros(20, 20)
    cam[2:18, 2:18] = 1.0
    points = cam_peaks(cam, peak_threshold=0.9, min_distance=6, max_points=10)
    assert len(points) > 1
    gaps = (points[:, None] - points[None]).abs().amax(dim=-1)
    assert bool((gaps + torch.eye(len(points)) * 99 > 6).all())


def test_everything_masks_through_the_predictor(tiny_sam):
    predictor = CachedSamPredictor(tiny_sam)
    image = (np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)
    masks, scores = everything_masks(
        predictor, image, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    assert masks.dtype == torch.bool and masks.shape[1:] == (24, 40) and len(masks) == len(scores) > 0
    areas = masks.flatten(1).sum(1)
    assert bool((areas[:-1] >= areas[1:]).all())
