"""SAM-derived prototypes: backbone features pooled over SAM segments, and the CAMs they give.

A classifier CAM lights up the most discriminative part of an object; a SAM segment spans the
whole object. Averaging backbone features over SAM segments gives prototypes that describe the
full object, and cosine similarity of every pixel feature to a class prototype yields a
"prototype CAM" that extends to the object's less discriminative parts. Fusing it with the
classifier CAM keeps the classifier's localisation while filling in the object's extent.

All functions are pure and batched: features ``BxDxhxw``, segments ``BxNxHxW`` at image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def segment_weights(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``BxNxhxw`` fraction of each feature cell a segment covers (area resampling of the masks)."""
    if masks.ndim != 4:
        raise ValueError(f"expected BxNxHxW masks, got {tuple(masks.shape)}")
    if masks.shape[1] == 0:
        return masks.new_zeros(masks.shape[0], 0, *size, dtype=torch.float32)
    return F.interpolate(masks.float(), size=size, mode="area")


def masked_average(features: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean feature per weight map: ``BxNxD`` prototypes and ``BxN`` validity.

    A weight map with (numerically) no mass gives a zero prototype marked invalid.
    """
    if features.ndim != 4 or weights.ndim != 4 or features.shape[0] != weights.shape[0]:
        raise ValueError(
            f"expected BxDxhxw features and BxNxhxw weights, got {tuple(features.shape)}, {tuple(weights.shape)}"
        )
    if features.shape[-2:] != weights.shape[-2:]:
        raise ValueError(
            f"weights {tuple(weights.shape[-2:])} not at feature size {tuple(features.shape[-2:])}"
        )
    weights = weights.to(features.dtype)
    mass = weights.sum(dim=(-2, -1))
    total = torch.einsum("bnhw,bdhw->bnd", weights, features)
    valid = mass > EPS
    protos = torch.where(valid[..., None], total / mass.clamp_min(EPS)[..., None], torch.zeros_like(total))
    return protos, valid


def segment_prototypes(features: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Masked average pooling of ``features`` over each SAM segment, at feature resolution.

    Returns ``BxNxD`` prototypes and ``BxN`` validity (False for segments too small to cover any
    feature cell measurably, and for padding segments that are all False).
    """
    return masked_average(features, segment_weights(masks, tuple(features.shape[-2:])))


def class_prototypes(
    features: Tensor, masks: Tensor, classes: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """One prototype per class from the union of the segments labelled with that class.

    ``classes`` is ``BxN`` (a segment's class, -1 for none, e.g. SEPL's unassigned masks or
    padding). Pooling over the union (not averaging segment prototypes) weights every feature
    cell once, however many overlapping segments cover it. Returns ``BxKxD`` and ``BxK`` validity.
    """
    if classes.shape != masks.shape[:2]:
        raise ValueError(f"classes {tuple(classes.shape)} does not match masks {tuple(masks.shape[:2])}")
    weights = segment_weights(masks, tuple(features.shape[-2:]))
    labelled = classes >= 0
    onehot = F.one_hot(classes.clamp_min(0).long(), num_classes).to(weights.dtype) * labelled[..., None]
    union = torch.einsum("bnk,bnhw->bkhw", onehot, weights).clamp_max(1.0)
    return masked_average(features, union)


def prototype_cams(features: Tensor, prototypes: Tensor, valid: Tensor | None = None) -> Tensor:
    """``BxKxhxw`` maps in [0, 1]: ReLU of cosine similarity to each prototype, divided by its max.

    ``prototypes`` is ``BxKxD`` (per image) or ``KxD`` (shared, e.g. dataset-level); maps of
    invalid prototypes are zero. Max-normalisation puts them on the classifier CAMs' scale.
    """
    if prototypes.ndim == 2:
        prototypes = prototypes[None].expand(features.shape[0], -1, -1)
    if valid is not None and valid.ndim == 1:
        valid = valid[None].expand(features.shape[0], -1)
    sim = torch.einsum("bdhw,bkd->bkhw", F.normalize(features, dim=1), F.normalize(prototypes, dim=-1)).relu()
    if valid is not None:
        sim = sim * valid[..., None, None].to(sim.dtype)
    peak = sim.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > EPS, sim / peak.clamp_min(EPS), torch.zeros_like(sim))


def fuse_cams(cams: Tensor, proto_cams: Tensor, weight: float = 0.5) -> Tensor:
    """Weighted mean ``(1 - weight) * cams + weight * proto_cams`` (default: the plain mean).

    ``proto_cams`` are resized (bilinear) to the CAMs' size first. Both inputs in [0, 1] keep the
    result in [0, 1]; a pixel stays high only where both sources agree, and the prototype term
    raises object parts the classifier under-activates.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    if cams.shape[:-2] != proto_cams.shape[:-2]:
        raise ValueError(f"CAMs {tuple(cams.shape)} and prototype CAMs {tuple(proto_cams.shape)} differ")
    if proto_cams.shape[-2:] != cams.shape[-2:]:
        lead = proto_cams.shape[:-2]
        flat = proto_cams.reshape(1, -1, *proto_cams.shape[-2:]).float()
        proto_cams = F.interpolate(flat, cams.shape[-2:], mode="bilinear", align_corners=False)
        proto_cams = proto_cams.reshape(*lead, *cams.shape[-2:]).clamp(0.0, 1.0)
    return (1.0 - weight) * cams + weight * proto_cams.to(cams.dtype)
