"""SAM prompts from CAMs: boxes around CAM regions, points at CAM peaks, and point grids.

Coordinates are continuous pixel coordinates of the CAM / image frame (pixel ``i`` spans
``[i, i + 1)``), which is what SAM's ResizeLongestSide scales: a box is ``(x0, y0, x1, y1)`` with
exclusive ends (COCO-style, as SAM was trained), a point is a pixel centre ``(x + 0.5, y + 0.5)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from torch import Tensor


def connected_components(mask: Tensor) -> Tensor:
    """Label the 8-connected components of a ``HxW`` bool mask as 1..n (0 = background).

    Pure torch, so no SciPy/OpenCV dependency: every pixel starts with its own flat index, takes
    the largest index among its neighbours (3x3 max-pool) and then jumps to its label's label
    (pointer jumping, which makes long components converge in few rounds). At the fixed point all
    pixels of a component hold the component's largest index; these are renumbered in raster order
    of that index.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got {tuple(mask.shape)}")
    fg = mask.bool()
    h, w = fg.shape
    if not fg.any():
        return torch.zeros(h, w, dtype=torch.int64, device=mask.device)
    index = torch.arange(h * w, device=mask.device, dtype=torch.float64).view(h, w)
    # float64 holds every index exactly; background is -1, below any index.
    labels = torch.where(fg, index, torch.full_like(index, -1.0))
    flat_fg = fg.view(-1)
    while True:
        neighbours = F.max_pool2d(labels[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
        grown = torch.where(fg, torch.maximum(labels, neighbours), labels).view(-1)
        jumped = torch.where(flat_fg, grown[grown.clamp_min(0).long()], grown).view(h, w)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    _, compact = torch.unique(labels[fg], return_inverse=True)
    out = torch.zeros(h, w, dtype=torch.int64, device=mask.device)
    out[fg] = compact + 1
    return out


def _region_of(cam: Tensor, fraction: float) -> Tensor | None:
    if cam.ndim != 2:
        raise ValueError(f"expected an HxW CAM, got {tuple(cam.shape)}")
    peak = cam.max()
    if not bool(peak > 0):
        return None  # an all-zero (or negative) CAM has no region
    return cam >= fraction * peak


def cam_boxes(cam: Tensor, cam_threshold: float, max_boxes: int, min_area: int = 1) -> Tensor:
    """Boxes around the largest connected regions where ``cam >= cam_threshold * cam.max()``.

    Returns ``Mx4`` float ``(x0, y0, x1, y1)``, largest region first, at most ``max_boxes``;
    regions smaller than ``min_area`` pixels are dropped; an empty ``0x4`` when none remains.
    """
    region = _region_of(cam, cam_threshold)
    if region is None or max_boxes <= 0:
        return cam.new_zeros(0, 4, dtype=torch.float32)
    labels = connected_components(region)
    n = int(labels.max())
    flat = labels.view(-1)
    areas = torch.bincount(flat, minlength=n + 1)[1:]
    order = torch.sort(areas, descending=True, stable=True).indices
    order = order[areas[order] >= min_area][:max_boxes]
    h, w = labels.shape
    ys = torch.arange(h, device=cam.device).repeat_interleave(w)
    xs = torch.arange(w, device=cam.device).repeat(h)
    big = torch.full((n + 1,), h * w, device=cam.device)
    x0 = big.scatter_reduce(0, flat, xs, "amin")
    y0 = big.scatter_reduce(0, flat, ys, "amin")
    x1 = torch.full_like(big, -1).scatter_reduce(0, flat, xs, "amax")
    y1 = torch.full_like(big, -1).scatter_reduce(0, flat, ys, "amax")
    ids = order + 1
    return torch.stack([x0[ids], y0[ids], x1[ids] + 1, y1[ids] + 1], dim=1).float()


def cam_peaks(cam: Tensor, peak_threshold: float, min_distance: int, max_points: int) -> Tensor:
    """Point prompts at CAM peaks, as S2C's CAM-based prompting: the global maximum first, then
    local maxima (maximal in their ``(2 * min_distance + 1)`` window) at or above
    ``peak_threshold * cam.max()``, strongest first, no two closer than ``min_distance`` pixels
    (Chebyshev), at most ``max_points``. Returns ``Mx2`` float ``(x, y)`` pixel centres.
    """
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    region = _region_of(cam, peak_threshold)
    if region is None or max_points <= 0:
        return cam.new_zeros(0, 2, dtype=torch.float32)
    window = 2 * min_distance + 1
    pooled = F.max_pool2d(cam[None, None].float(), window, stride=1, padding=min_distance)[0, 0]
    candidates = torch.nonzero(region & (cam.float() >= pooled))  # (y, x), plateaus included
    values = cam[candidates[:, 0], candidates[:, 1]]
    candidates = candidates[torch.sort(values, descending=True, stable=True).indices]
    kept: list[Tensor] = []
    while candidates.numel() and len(kept) < max_points:
        best = candidates[0]
        kept.append(best)
        far = (candidates - best).abs().amax(dim=1) > min_distance
        candidates = candidates[far]
    yx = torch.stack(kept).float()
    return yx.flip(1) + 0.5


def _max_filter(image: Tensor, size: int, pad_value: float | None) -> Tensor:
    """``scipy.ndimage.maximum_filter`` with a square window: ``pad_value`` as ``mode='constant'``
    (``cval``), None as ``mode='nearest'`` (the window clipped to the image gives the same maximum)."""
    r = size // 2
    x = image[None, None]
    if pad_value is not None:
        x = F.pad(x, (r, r, r, r), value=pad_value)
        return F.max_pool2d(x, size, stride=1)[0, 0]
    return F.max_pool2d(x, size, stride=1, padding=r)[0, 0]


def peak_local_max(image: Tensor, min_distance: int) -> Tensor:
    """``skimage.feature.peak_local_max(image, min_distance)`` with its other defaults, for 2-D.

    As scikit-image 0.26: candidates equal the maximum of their ``2 * min_distance + 1`` window
    (none if that holds everywhere), exceed ``image.min()`` and lie at least ``min_distance`` from
    the border (``exclude_border=True``); strongest first, ties in raster order (a stable sort), each
    kept unless closer than ``min_distance`` (Chebyshev) to one kept before. Returns ``M x 2`` int64
    ``(row, col)``. S2C pins 0.21, which differs only in sorting with NumPy's unstable quicksort, so
    which of several equal values (a plateau) comes first is left to that sort there.
    """
    if image.ndim != 2:
        raise ValueError(f"expected an HxW image, got {tuple(image.shape)}")
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    h, w = image.shape
    image = image.float()
    peak = image == _max_filter(image, 2 * min_distance + 1, None)
    if bool(peak.all()):
        return torch.zeros(0, 2, dtype=torch.int64, device=image.device)
    peak &= image > image.min()
    border = torch.zeros_like(peak)
    border[min_distance : h - min_distance, min_distance : w - min_distance] = True
    peak &= border
    coords = torch.nonzero(peak)  # raster order
    values = image[coords[:, 0], coords[:, 1]]
    coords = coords[torch.sort(values, descending=True, stable=True).indices]
    if min_distance <= 1 or coords.shape[0] <= 1:
        return coords  # spacing 1 only parts identical points
    kept: list[Tensor] = []
    while coords.numel():
        best = coords[0]
        kept.append(best)
        coords = coords[(coords - best).abs().amax(dim=1) >= min_distance]
    return torch.stack(kept)


def s2c_peaks(
    cam: Tensor, threshold: float = 0.5, min_distance: int = 20, max_points: int | None = None
) -> Tensor:
    """S2C's point prompts for one class's max-normalised CAM, as ``update()`` in S2C's
    ``models/model_s2c.py`` (github.com/sangrockEG/S2C) samples them.

    The global maximum (first in raster order) first; then the local maxima of the CAM after a 3 x 3
    maximum filter (zero-padded, ``ndi.maximum_filter(size=3, mode='constant')``), found by
    :func:`peak_local_max` with ``min_distance``, kept where the unfiltered CAM exceeds
    ``threshold`` (``th_multi``, 0.5), less the first of them (the official code assumes it is the
    global maximum again). No cap, as there; ``max_points`` caps the total. Returns ``M x 2`` int64
    ``(row, col)`` pixel indices: the official code scales these, not pixel centres, to SAM's input.
    """
    if cam.ndim != 2:
        raise ValueError(f"expected an HxW CAM, got {tuple(cam.shape)}")
    w = cam.shape[1]
    flat = int(torch.argmax(cam.reshape(-1)))
    peak_max = torch.tensor([[flat // w, flat % w]], dtype=torch.int64, device=cam.device)
    filtered = _max_filter(cam.float(), 3, 0.0)
    found = peak_local_max(filtered, min_distance)
    valid = found[cam[found[:, 0], found[:, 1]] > threshold]
    peaks = torch.cat([peak_max, valid[1:]])
    return peaks if max_points is None else peaks[: max(max_points, 0)]


def everything_masks(
    predictor: SamPredictor,
    image: np.ndarray,
    points_per_side: int = 32,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    points_per_batch: int = 64,
) -> tuple[Tensor, Tensor]:
    """SAM's automatic ("everything") masks from a point grid over an ``HxWx3`` uint8 image.

    Runs segment_anything's SamAutomaticMaskGenerator through ``predictor`` (so a cached
    predictor's embeddings are reused). Returns ``NxHxW`` bool masks, largest first, and their
    predicted IoU.
    """
    generator = SamAutomaticMaskGenerator(
        predictor.model,
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        output_mode="binary_mask",
    )
    generator.predictor = predictor
    records = sorted(generator.generate(image), key=lambda r: -int(r["area"]))
    h, w = image.shape[:2]
    if not records:
        return torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0)
    masks = torch.from_numpy(np.stack([r["segmentation"] for r in records])).bool()
    scores = torch.tensor([float(r["predicted_iou"]) for r in records])
    return masks, scores
