"""Pseudo-labels made during training from the current CAMs (ToCo, DuPL).

Why: single-stage methods train a segmentation head on labels refined from the network's own CAMs
at every step. Both follow ToCo's ``utils/camutils.py``:

* ``multi_scale_cam2``: CAMs of each scale (1.0 first) and its mirror, resized to the input, the
  element-wise max of an image and its mirror, rectified, summed over scales, then shifted to a
  minimum of 0 and divided by the maximum (+1e-5), per class; no gradient;
* ``refine_cams_with_bkg_v2``: the present classes' CAMs, with a constant background channel of a
  high (0.7; one per image in DuPL's ``refine_cams_with_dynamic_thres``) and a low (0.25) score,
  through a softmax and PAR at half resolution; a pixel is background where both say so, ignored
  where only the high one does, otherwise its class
  (``wsss_domains.refine.background.dual_threshold_labels``).

Labels are ``B x H x W`` int64: 0 background, ``k + 1`` for foreground class ``k``, ``ignore_index``.
PAR runs on the normalised image: its colour affinity divides differences by the local standard
deviation per channel, so it is the same as on the official de-normalised image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.cam.extract import min_max_per_class
from wsss_domains.refine.background import TOCO_HIGH_THRESHOLD, TOCO_LOW_THRESHOLD, dual_threshold_labels
from wsss_domains.refine.par import PixelAdaptiveRefiner

CAM_SCALES = (1.0, 0.5, 1.5)
IGNORE_INDEX = 255


@torch.no_grad()
def multi_scale_cams(
    cam_fn: Callable[[Tensor], Tensor], images: Tensor, scales: Sequence[float] = CAM_SCALES
) -> Tensor:
    """``B x K x H x W`` CAMs in [0, 1] from ``cam_fn`` (raw CAMs of a batch), ToCo's multi-scale recipe."""
    b, _, h, w = images.shape
    total: Tensor | None = None
    for scale in dict.fromkeys([1.0, *scales]):
        x = (
            images
            if scale == 1.0
            else F.interpolate(
                images, size=(int(scale * h), int(scale * w)), mode="bilinear", align_corners=False
            )
        )
        cams = F.interpolate(
            cam_fn(torch.cat([x, x.flip(-1)])), size=(h, w), mode="bilinear", align_corners=False
        )
        cams = F.relu(torch.maximum(cams[:b], cams[b:].flip(-1)))
        total = cams if total is None else total + cams
    assert total is not None
    return min_max_per_class(total)


def refined_labels(
    images: Tensor,
    cams: Tensor,
    labels: Tensor,
    refiner: PixelAdaptiveRefiner,
    high: float | Tensor = TOCO_HIGH_THRESHOLD,
    low: float = TOCO_LOW_THRESHOLD,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """PAR-refined dual-threshold labels ``B x H x W`` from CAMs ``B x K x H x W`` and labels ``B x K``.

    ``high`` is one background score for the batch or one per image (``B``: DuPL's class-wise
    schedule, ``refine_cams_with_dynamic_thres``, whose background map is constant per image).
    """
    highs = [float(h) for h in high] if isinstance(high, Tensor) else [float(high)] * cams.shape[0]
    if len(highs) != cams.shape[0]:
        raise ValueError(f"{len(highs)} high thresholds for {cams.shape[0]} images")
    out = torch.zeros(cams.shape[0], *cams.shape[-2:], dtype=torch.long, device=cams.device)
    for i in range(cams.shape[0]):
        present = labels[i].nonzero().flatten()
        if present.numel() == 0:
            continue  # only the background channel: background everywhere
        raw = dual_threshold_labels(refiner, images[i], cams[i, present], low, highs[i], ignore_index)
        ids = torch.cat([present.new_zeros(1), present + 1])
        keep = raw != ignore_index
        out[i] = torch.where(keep, ids[raw.clamp_max(present.numel())], torch.full_like(raw, ignore_index))
    return out


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """ToCo's ``get_seg_loss``: mean of the cross-entropy over background and over foreground pixels.

    A part without any pixel contributes 0 (the official code would give NaN).
    """

    def part(keep: Tensor) -> Tensor:
        if not keep.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target.masked_fill(~keep, ignore_index), ignore_index=ignore_index)

    valid = target != ignore_index
    return 0.5 * (part(valid & (target == 0)) + part(valid & (target != 0)))
