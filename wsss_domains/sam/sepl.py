"""SEPL: SAM-enhanced pseudo-labels, by giving whole SAM masks the class of the CAM pseudo-label.

CAM pseudo-labels know *what* is in the image but draw poor boundaries; SAM masks draw good
boundaries but know no class. SEPL (Chen et al., NeurIPS 2023) keeps the CAM's classes and SAM's
shapes: a SAM mask takes a class when it mostly lies inside that class's pseudo-label region, or
when it covers nearly all of that region (an object whose CAM only caught part of it, or a small
object inside a larger mask).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAJORITY = 0.5  # a mask goes to class i when more than this fraction of it lies in class i
COVERAGE = 0.85  # ... or when it covers at least this fraction of class i's region


def sepl_assign(
    pseudo_label: Tensor,
    masks: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    background_index: int | None = None,
    majority: float = MAJORITY,
    coverage: float = COVERAGE,
) -> Tensor:
    """The class each SAM mask takes under SEPL's rules, or -1 when neither rule holds.

    For mask ``m`` and class region ``P_i`` (pixels labelled ``i``; ignored pixels are in no
    region but do count in ``|m|``):

    * majority: ``|m & P_i| / |m| > majority`` (at most one class can pass);
    * coverage: ``|m & P_i| / |P_i| >= coverage``.

    When both rules name classes, the majority class wins -- unless it is ``background_index``:
    CAMs under-activate objects, so a mask that is "mostly background" by the CAM but holds all
    of an object's CAM region is that object (the case the coverage rule exists for). Among
    several covered classes the one with the largest overlap wins. Empty masks take no class.
    """
    if pseudo_label.ndim != 2 or masks.ndim != 3 or masks.shape[-2:] != pseudo_label.shape:
        raise ValueError(
            f"expected pseudo_label HxW and masks NxHxW of the same size, got {tuple(pseudo_label.shape)}"
            f" and {tuple(masks.shape)}"
        )
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=masks.device)
    flat = pseudo_label.reshape(-1).long()
    valid = flat != ignore_index
    if bool(((flat[valid] < 0) | (flat[valid] >= num_classes)).any()):
        raise ValueError(f"pseudo_label holds ids outside 0..{num_classes - 1} and ignore {ignore_index}")
    onehot = torch.zeros(flat.numel(), num_classes, dtype=torch.float64, device=masks.device)
    onehot[valid.nonzero().flatten(), flat[valid]] = 1.0
    m = masks.reshape(n, -1).to(torch.float64)
    overlap = m @ onehot  # N x C pixel counts
    mask_area = m.sum(dim=1, keepdim=True)
    class_area = onehot.sum(dim=0, keepdim=True)
    major = overlap / mask_area.clamp_min(1.0) > majority
    covering = (overlap >= coverage * class_area) & (overlap > 0)
    out = torch.full((n,), -1, dtype=torch.int64, device=masks.device)
    # Weakest claim first, so that stronger ones overwrite it.
    if background_index is not None:
        by_background = major[:, background_index]
        out[by_background] = background_index
        major = major.clone()
        major[:, background_index] = False
    has_cover = covering.any(dim=1)
    by_coverage = torch.where(covering, overlap, torch.full_like(overlap, -1.0)).argmax(dim=1)
    out[has_cover] = by_coverage[has_cover]
    has_major = major.any(dim=1)
    out[has_major] = major.long().argmax(dim=1)[has_major]
    out[mask_area[:, 0] == 0] = -1
    return out


def sepl_refine(
    pseudo_label: Tensor,
    masks: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    background_index: int | None = None,
    majority: float = MAJORITY,
    coverage: float = COVERAGE,
    keep_ignore: bool = True,
) -> Tensor:
    """Refine a CAM pseudo-label (``HxW`` int64) with SAM masks (``NxHxW`` bool); returns ``HxW``.

    Each mask's class comes from :func:`sepl_assign` (majority > 50% of the mask in class i, or
    coverage >= 85% of class i's region; pass the label space's ``background_index`` so that a
    mask covering an under-activated object is not lost to a background majority). Labelled masks are painted largest first, so where masks
    overlap the smaller, more specific mask decides. Pixels that no labelled mask covers keep their
    CAM label. With ``keep_ignore`` (default) pixels the pseudo-label marks ``ignore_index`` stay
    ignored (they are usually excluded or no-data pixels a domain ruled out, not SAM's to fill).
    """
    classes = sepl_assign(
        pseudo_label, masks, num_classes, ignore_index, background_index, majority, coverage
    )
    out = pseudo_label.clone().long()
    labelled = torch.nonzero(classes >= 0).flatten()
    if labelled.numel() == 0:
        return out
    areas = masks[labelled].reshape(labelled.numel(), -1).sum(dim=1)
    # Stable sort: among equal areas the earlier mask is painted first, the later one wins.
    order = labelled[torch.sort(areas, descending=True, stable=True).indices]
    painted = torch.full_like(out, -1)
    for i in order.tolist():
        painted[masks[i].bool()] = classes[i]
    write = painted >= 0
    if keep_ignore:
        write &= pseudo_label != ignore_index
    out[write] = painted[write]
    return out
