"""Prompts from synthetic CAMs: connected components, region boxes, peak points, point grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from wsss_domains.sam.predictor import CachedSamPredictor
from wsss_domains.sam.prompts import (
    cam_boxes,
    cam_peaks,
    connected_components,
    everything_masks,
    peak_local_max,
    s2c_peaks,
)


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


# -- S2C's peaks: models/model_s2c.py of github.com/sangrockEG/S2C --------------------------------


def nd_maximum_filter(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """``scipy.ndimage.maximum_filter(image, size, mode)`` for ``constant`` (cval 0) and ``nearest``."""
    r = size // 2
    padded = np.pad(image, r, mode="constant" if mode == "constant" else "edge")
    return sliding_window_view(padded, (size, size)).max(axis=(-2, -1))


def skimage_peak_local_max(image: np.ndarray, min_distance: int) -> np.ndarray:
    """``skimage.feature.peak_local_max(image, min_distance=min_distance)``, scikit-image 0.26's
    ``_get_peak_mask``, ``_exclude_border``, ``_get_high_intensity_peaks`` and ``_ensure_spacing``."""
    threshold = image.min()
    image_max = nd_maximum_filter(image, 2 * min_distance + 1, "nearest")
    out = image == image_max
    if np.all(out):
        out[:] = False
    out &= image > threshold
    out[:min_distance] = out[-min_distance:] = False
    out[:, :min_distance] = out[:, -min_distance:] = False
    coord = np.transpose(np.nonzero(out))
    coord = coord[np.argsort(-image[tuple(coord.T)], kind="stable")]
    if min_distance <= 1 or len(coord) == 0:
        return coord
    rejected: set[int] = set()
    for idx in range(len(coord)):
        if idx in rejected:
            continue
        dist = np.abs(coord - coord[idx]).max(axis=1)  # p_norm=inf
        rejected.update(int(j) for j in np.nonzero(dist < min_distance)[0] if j != idx)
    return np.delete(coord, sorted(rejected), axis=0)


def official_s2c_peaks(
    cam_target_np: np.ndarray, th_multi: float = 0.5, min_distance: int = 20
) -> np.ndarray:
    """The "Sample local peaks" block of ``model_WSSS.update``, for one class's CAM."""
    h, w = cam_target_np.shape
    argmax_indices = int(np.argmax(cam_target_np.reshape(-1)))
    peak_max = np.array([[argmax_indices // w, argmax_indices % w]])
    cam_filtered = nd_maximum_filter(cam_target_np, 3, "constant")
    peaks_temp = skimage_peak_local_max(cam_filtered, min_distance).reshape(-1, 2)
    peaks_valid = peaks_temp[cam_target_np[peaks_temp[:, 0], peaks_temp[:, 1]] > th_multi]
    return np.concatenate((peak_max, peaks_valid[1:]), axis=0)


def bump_cam(h: int, w: int, bumps: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Max-normalised float32 sum of Gaussian bumps ``(y, x, sigma, height)``, as S2C's ``cam_ms``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cam = np.zeros((h, w))
    for y, x, s, a in bumps:
        cam += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2.0 * s * s))
    return (cam / (cam.max() + 1e-5)).astype(np.float32)


# Peaks printed by the official block run with scikit-image 0.26 and SciPy 1.17 on these CAMs.
CAM_A = bump_cam(
    128,
    112,
    [(30.3, 30.6, 8, 1.0), (36.2, 58.1, 6, 0.7), (90.5, 40.2, 10, 0.9), (100.4, 90.7, 7, 0.55),
     (60.2, 85.3, 5, 0.45), (15.6, 100.2, 6, 0.8), (70.1, 60.4, 4, 0.6)],
)  # fmt: skip
CAM_B = bump_cam(
    96, 96, [(8.4, 9.3, 6, 1.0), (40.2, 50.7, 7, 0.8), (70.6, 30.1, 6, 0.75), (60.3, 75.8, 5, 0.6)]
)
SKIMAGE_PEAKS_A = [[29, 30], [89, 39], [35, 59], [99, 90], [59, 85]]
SKIMAGE_PEAKS_B = [[39, 50], [70, 29]]
S2C_PEAKS_A = [[30, 31], [89, 39], [35, 59], [99, 90]]
S2C_PEAKS_B = [[8, 9], [70, 29]]


def test_s2c_peaks_match_the_official_block_on_fixed_cams():
    """A: the border bump (15, 100) and the 0.45 one go; the first local peak (29, 30), the global
    maximum's 3 x 3 plateau, is dropped for the maximum itself. B: the maximum lies in the 20 px
    border, so ``peaks_valid[1:]`` drops a real peak, (39, 50), as the official code does."""
    for cam, plm, expected in ((CAM_A, SKIMAGE_PEAKS_A, S2C_PEAKS_A), (CAM_B, SKIMAGE_PEAKS_B, S2C_PEAKS_B)):
        filtered = nd_maximum_filter(cam, 3, "constant")
        assert skimage_peak_local_max(filtered, 20).tolist() == plm  # the transcription, anchored
        assert peak_local_max(torch.from_numpy(filtered), 20).tolist() == plm
        assert official_s2c_peaks(cam).tolist() == expected
        assert s2c_peaks(torch.from_numpy(cam)).tolist() == expected


def random_cam(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = [(96, 96), (128, 96), (64, 80), (160, 160)][seed % 4]
    bumps = [
        (rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 25), rng.uniform(0.2, 1.0))
        for _ in range(rng.integers(1, 9))
    ]
    cam = bump_cam(h, w, bumps)
    if seed % 3 == 0:  # blocky, as nearest-upsampled CAMs: large plateaus
        cam = np.kron(rng.random((h // 16, w // 16)) ** 3, np.ones((16, 16))).astype(np.float32)
        cam = cam / (cam.max() + np.float32(1e-5))
    if seed % 5 == 0:  # quantised: many ties
        cam = (np.round(cam * 8) / 8).astype(np.float32)
    return cam


@pytest.mark.parametrize("seed", range(24))
def test_s2c_peaks_match_the_official_block_on_random_cams(seed):
    cam = random_cam(seed)
    for threshold, distance in ((0.5, 20), (0.3, 8), (0.5, 1)):
        expected = official_s2c_peaks(cam, threshold, distance)
        out = s2c_peaks(torch.from_numpy(cam), threshold, distance)
        assert out.dtype == torch.int64 and out.tolist() == expected.tolist()


def test_s2c_peaks_have_no_cap_unless_asked_and_a_flat_cam_prompts_its_first_pixel():
    cam = bump_cam(160, 160, [(30 + 50 * (i // 3), 30 + 50 * (i % 3), 6, 1.0 - 0.04 * i) for i in range(9)])
    peaks = s2c_peaks(torch.from_numpy(cam))
    assert len(peaks) == 9 > 4  # the former cap was the domain's max_prompts_per_class (4)
    assert s2c_peaks(torch.from_numpy(cam), max_points=3).tolist() == peaks[:3].tolist()
    # An all-zero CAM of a present class: argmax is pixel 0 and no local peak exists.
    assert s2c_peaks(torch.zeros(40, 40)).tolist() == [[0, 0]]


def test_everything_masks_through_the_predictor(tiny_sam):
    predictor = CachedSamPredictor(tiny_sam)
    image = (np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)
    masks, scores = everything_masks(
        predictor, image, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    assert masks.dtype == torch.bool and masks.shape[1:] == (24, 40) and len(masks) == len(scores) > 0
    areas = masks.flatten(1).sum(1)
    assert bool((areas[:-1] >= areas[1:]).all())
