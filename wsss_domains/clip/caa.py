"""Class-aware attention affinity (CAA), the CLIP-ES refinement of GradCAM maps.

CLIP-ES turns the mean attention of the ViT's last blocks into an affinity: three rounds of
Sinkhorn normalisation (columns then rows), symmetrisation, one squaring. Each class's CAM is
propagated through the affinity restricted to the bounding boxes of its CAM's connected regions
above 0.4 of its maximum, so attention only spreads a class inside its own boxes.

Box masks follow the official ``scoremap2bbox`` exactly (uint8 quantisation, strict threshold,
8-connected regions as ``cv2.findContours`` traces them, box end clipped to ``size - 1`` and used as
an exclusive slice end, so a region touching the right/bottom edge loses that last column/row) so
CAMs match the published pipeline; connected regions are labelled in torch, without OpenCV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sinkhorn_affinity(attn: Tensor, rounds: int = 3) -> Tensor:
    """``N x N`` attention to CLIP-ES's symmetric, squared, near doubly-stochastic affinity."""
    t = attn.float()
    for _ in range(rounds):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def _component_labels(binary: Tensor) -> Tensor:
    """8-connected component labels (0 = off): each pixel takes the largest id reachable."""
    h, w = binary.shape
    on = binary.double()
    labels = torch.arange(1, h * w + 1, dtype=torch.float64, device=binary.device).view(h, w) * on
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * on
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def box_mask(cam: Tensor, threshold: float = 0.4) -> Tensor:
    """Union of the official CLIP-ES boxes around ``cam``'s regions above ``threshold`` x max: ``h x w``."""
    h, w = cam.shape
    quantised = (cam.float().cpu() * 255).to(torch.uint8)
    cut = int(threshold * int(quantised.max()))
    mask = torch.zeros(h, w, dtype=torch.bool)
    labels = _component_labels(quantised > cut)
    ids = labels[labels > 0].unique()
    if ids.numel() == 0:
        return mask.to(cam.device)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in ids.tolist():
        inside = labels == i
        y0, y1 = int(ys[inside].min()), int(ys[inside].max()) + 1
        x0, x1 = int(xs[inside].min()), int(xs[inside].max()) + 1
        mask[y0 : min(y1, h - 1), x0 : min(x1, w - 1)] = True
    return mask.to(cam.device)


def caa_refine(cams: Tensor, affinity: Tensor, box_threshold: float = 0.4) -> Tensor:
    """Propagate each class map (``K x h x w``) through ``affinity`` (``hw x hw``) inside its boxes."""
    k, h, w = cams.shape
    masks = torch.stack([box_mask(c, box_threshold) for c in cams]).view(k, h * w).to(cams.dtype)
    # (A * m) @ c == A @ (m * c): masking the affinity's columns equals masking the CAM.
    refined = affinity.to(cams.dtype) @ (masks * cams.reshape(k, h * w)).T
    return refined.T.reshape(k, h, w)
