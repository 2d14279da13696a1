"""Background as a constant channel, and ToCo's two-threshold pseudo-labels built on it.

CAMs only score foreground classes. For domains whose background is "wherever no class is
confident", ToCo (Ru et al., CVPR 2023; ``utils/camutils.py::refine_cams_with_bkg_v2`` and
``tools/infer_cam_crf_label.py``) prepends a channel filled with a background score and lets the
refiner (PAR or dense CRF) arbitrate between it and the CAMs. It does this twice, with a high and a
low background score (0.7 and 0.25 on VOC), and keeps a pixel's label only where both agree:

* both refinements say background          -> background (0),
* high says background, low says a class   -> ignore (uncertain),
* otherwise                                -> the class from the high-threshold refinement.

Domains with no background class skip all of this (``bg_threshold=None``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wsss_domains.refine.base import Refiner

# ToCo's VOC/COCO defaults (``--low_thre`` / ``--high_thre`` and ``--bkg_thre_l`` / ``--bkg_thre_h``).
TOCO_LOW_THRESHOLD = 0.25
TOCO_HIGH_THRESHOLD = 0.7


def add_background(cams: Tensor, threshold: float) -> Tensor:
    """Prepend a constant background channel (channel 0) to ``KxHxW`` or ``BxKxHxW`` CAMs."""
    shape = list(cams.shape)
    shape[-3] = 1
    background = torch.full(shape, float(threshold), dtype=cams.dtype, device=cams.device)
    return torch.cat([background, cams], dim=-3)


def dual_threshold_labels(
    refiner: Refiner,
    image: Tensor,
    cams: Tensor,
    low: float = TOCO_LOW_THRESHOLD,
    high: float = TOCO_HIGH_THRESHOLD,
    ignore_index: int = 255,
) -> Tensor:
    """ToCo's pseudo-label: refine with a high and a low background score and combine.

    Returns an int64 ``HxW`` (or ``BxHxW``) map where 0 is background, ``k+1`` is the k-th CAM
    channel and ``ignore_index`` marks pixels the two refinements disagree on. Map ``k+1`` to dataset
    class ids with the image's list of present classes.
    """
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if 0 <= ignore_index <= cams.shape[-3]:
        raise ValueError(f"ignore_index {ignore_index} collides with a label in 0..{cams.shape[-3]}")
    label_high = refiner(image, cams, bg_threshold=high).argmax(dim=-3)
    label_low = refiner(image, cams, bg_threshold=low).argmax(dim=-3)
    label = label_high.clone()
    label[label_high == 0] = ignore_index
    label[(label_high == 0) & (label_low == 0)] = 0
    return label
