"""SEPL: SAM-enhanced pseudo-labels, by giving whole SAM masks the class of the CAM pseudo-label.

CAM pseudo-labels know *what* is in the image but draw poor boundaries; SAM masks draw good
boundaries but know no class. SEPL (Chen et al., NeurIPS 2023) keeps the CAM's classes and SAM's
shapes. This module follows the official default merge, ``MaxIoU_IMP2.merge`` in
``merge/max_iou_imp2.py`` of github.com/cskyl/SAM_WSSS (``main.py``'s default ``--method``):

* the foreground classes are visited in index order; class ``i`` claims every SAM mask not claimed
  by an earlier class that mostly lies in its pseudo-label region or covers nearly all of it;
* the output starts as background; class ``i`` paints its claimed masks and the pixels of its
  region that no mask unclaimed before class ``i`` touches ("trust CAM if SAM has no prediction");
* a later class paints over an earlier one, so overlaps resolve by class order.

So pixels of a mask no class claims become background, and background never claims a mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAJORITY = 0.5  # a mask goes to class i when more than this fraction of it lies in class i
COVERAGE = 0.85  # ... or when it covers at least this fraction of class i's region


def _check(pseudo_label: Tensor, masks: Tensor, num_classes: int, ignore_index: int) -> None:
    if pseudo_label.ndim != 2 or masks.ndim != 3 or masks.shape[-2:] != pseudo_label.shape:
        raise ValueError(
            f"expected pseudo_label HxW and masks NxHxW of the same size, got {tuple(pseudo_label.shape)}"
            f" and {tuple(masks.shape)}"
        )
    flat = pseudo_label.reshape(-1).long()
    valid = flat[flat != ignore_index]
    if bool(((valid < 0) | (valid >= num_classes)).any()):
        raise ValueError(f"pseudo_label holds ids outside 0..{num_classes - 1} and ignore {ignore_index}")


def _foreground(num_classes: int, background_index: int | None) -> list[int]:
    return [c for c in range(num_classes) if c != background_index]


def sepl_assign(
    pseudo_label: Tensor,
    masks: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    background_index: int | None = None,
    majority: float = MAJORITY,
    coverage: float = COVERAGE,
) -> Tensor:
    """The class each SAM mask takes under SEPL's rules, or -1 when no class claims it.

    For mask ``m`` and class region ``P_i`` (pixels labelled ``i``; ignored pixels are in no
    region but count in ``|m|``), class ``i`` claims ``m`` when

    * majority: ``|m & P_i| > majority * |m|`` (official: ``2 * |m & P_i| - |m| > 0``), or
    * coverage: ``|m & P_i| / |P_i| >= coverage``.

    As ``max_iou_imp2.py``'s ``seen`` list, the first foreground class in index order that claims a
    mask keeps it; ``background_index`` (0 in the official VOC setting) and classes without pixels
    claim nothing. Empty masks take no class.
    """
    _check(pseudo_label, masks, num_classes, ignore_index)
    n = masks.shape[0]
    out = torch.full((n,), -1, dtype=torch.int64, device=masks.device)
    if n == 0:
        return out
    flat = pseudo_label.reshape(-1).to(masks.device).long()
    m = masks.reshape(n, -1).to(torch.float64)
    mask_area = m.sum(dim=1)
    # Last class first, so that earlier classes (in index order) overwrite: the first claim wins.
    for c in reversed(_foreground(num_classes, background_index)):
        region = (flat == c).to(torch.float64)
        class_area = region.sum()
        if class_area == 0:
            continue
        overlap = m @ region
        claims = (overlap > majority * mask_area) | (overlap / class_area >= coverage)
        out[claims] = c
    return out


def sepl_refine(
    pseudo_label: Tensor,
    masks: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    background_index: int | None = None,
    keep_ignore: bool = True,
) -> Tensor:
    """Refine a CAM pseudo-label (``HxW`` int64) with SAM masks (``NxHxW`` bool); returns ``HxW``.

    The merge of ``MaxIoU_IMP2.merge`` (SAM_WSSS ``merge/max_iou_imp2.py``): starting from
    ``background_index``, each foreground class ``i`` in index order paints the masks it claims
    (:func:`sepl_assign` at the official thresholds) and its CAM pixels that no mask still unclaimed
    before ``i`` covers; later classes paint over earlier ones. Pixels of masks no class claims become background.

    Beyond the official code, for inputs it never sees (its pseudo-labels hold class ids only):

    * without a background class (``background_index`` None) the start, and so every pixel no
      class paints, is ``ignore_index``: "claimed by no class" has no class to fall back on;
    * with ``keep_ignore`` (default) pixels the pseudo-label marks ``ignore_index`` (a domain's
      exclude mask or no-data) stay ignored; ``keep_ignore=False`` lets the merge paint them as
      the official code would paint any non-class pixel.
    """
    classes = sepl_assign(pseudo_label, masks, num_classes, ignore_index, background_index)
    label = pseudo_label.to(masks.device).long()
    start = ignore_index if background_index is None else background_index
    out = torch.full_like(label, start)
    m = masks.bool()
    for c in _foreground(num_classes, background_index):
        region = label == c
        if not region.any():
            continue
        # Masks not in the official ``seen`` list when class c starts: unclaimed, or claimed by c
        # or a later class.
        unseen = (classes < 0) | (classes >= c)
        sam_any = m[unseen].any(dim=0) if bool(unseen.any()) else torch.zeros_like(region)
        paint = region & ~sam_any
        if bool((classes == c).any()):
            paint |= m[classes == c].any(dim=0)
        out[paint] = c
    if keep_ignore:
        out[label == ignore_index] = ignore_index
    return out.to(pseudo_label.device)
