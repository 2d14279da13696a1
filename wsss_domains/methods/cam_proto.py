"""CAM + image-specific prototypes from a backbone's intermediate stage (no extra model, no training).

Why: a classifier's last-stage CAM is coarse (output stride 16) and, where classes co-occur in
nearly every training image (tumour beside stroma, road beside car), it is barely
class-discriminative: both maps light up the same tissue or scene. An intermediate stage still
describes local texture and colour at a finer grain. Averaging its features over each class's
*confident* CAM pixels gives one prototype per class for this image (the image-specific prototypes
of SIPE, Chen et al. CVPR 2022, here computed post hoc from a plain classifier); each pixel's cosine
similarity to them is a prototype CAM that follows texture rather than the classifier's
discriminative peaks.

Steps, per image:

1. the plain CAM pseudo-label (arg-max over present classes, the domain's background rule);
2. the seeds of class ``c``: pixels labelled ``c`` whose CAM ``c`` lies in the top
   ``seed_fraction`` (0.3) of CAM ``c`` over the image's scored pixels — pixels labelled ``c``
   if that leaves none;
3. the prototype of ``c``: mean feature of stage ``stage`` (default ``-2``, timm's second-to-last
   ``feature_info`` entry: stride 16 before the last block group for EfficientNet) over its seeds,
   features flip-averaged at the classifier's training magnification;
4. ``cam' = norm((1 - w) * cam + w * proto_cam)`` for the present classes with seeds
   (``fuse_weight`` ``w``; ``norm``: per-class max).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_proto import fuse_prototype_cams
from wsss_domains.pseudo_labels.assemble import cams_to_labels
from wsss_domains.sam.prototypes import masked_average, prototype_cams
from wsss_domains.training.data import normalize

STAGE = -2
SEED_FRACTION = 0.3
FUSE_WEIGHT = 0.5


def confident_seeds(cams: Tensor, labels: Tensor, scored: Tensor, seed_fraction: float) -> Tensor:
    """``K x H x W`` boolean seeds: pixels labelled ``k`` (channel index) with CAM ``k`` in its top share.

    ``labels`` holds channel indices (-1 for none); ``scored`` marks the pixels that count. The
    threshold of class ``k`` is the ``1 - seed_fraction`` quantile of ``cams[k]`` over ``scored``;
    a class left without seeds falls back to all its labelled pixels.
    """
    if not 0.0 < seed_fraction <= 1.0:
        raise ValueError(f"seed_fraction must lie in (0, 1], got {seed_fraction}")
    seeds = torch.zeros_like(cams, dtype=torch.bool)
    if not scored.any():
        return seeds
    for k in range(cams.shape[0]):
        mine = (labels == k) & scored
        if not mine.any():
            continue
        values = cams[k][scored].float()
        threshold = torch.quantile(values, 1.0 - seed_fraction) if values.numel() > 1 else values[0]
        top = mine & (cams[k] >= threshold.to(cams.dtype))
        seeds[k] = top if top.any() else mine
    return seeds


def label_channels(labels: Tensor, label_space: LabelSpace) -> Tensor:
    """A pseudo-label map of class ids as CAM channel indices (-1 for background and ignore)."""
    table = torch.full((label_space.num_classes + 1,), -1, dtype=torch.int64, device=labels.device)
    table[list(label_space.foreground)] = torch.arange(len(label_space.foreground), device=labels.device)
    return table[torch.where(labels < label_space.num_classes, labels, label_space.num_classes)]


@register_method
class CamProto(Method):
    name = "cam-proto"
    description = (
        "CAM fused with image-specific prototype CAMs: an intermediate backbone stage's features averaged"
        " over each class's most confident CAM pixels (post hoc, no SAM; options stage, seed_fraction,"
        " fuse_weight)."
    )

    def __init__(
        self, stage: int = STAGE, seed_fraction: float = SEED_FRACTION, fuse_weight: float = FUSE_WEIGHT
    ) -> None:
        super().__init__(stage=stage, seed_fraction=seed_fraction, fuse_weight=fuse_weight)
        self._extractor: CamExtractor | None = None
        self.stage = int(stage)
        self.seed_fraction = float(seed_fraction)
        self.fuse_weight = float(fuse_weight)
        if not 0.0 < self.seed_fraction <= 1.0:
            raise ValueError(f"cam-proto: seed_fraction must lie in (0, 1], got {self.seed_fraction}")
        if not 0.0 <= self.fuse_weight <= 1.0:
            raise ValueError(f"cam-proto: fuse_weight must lie in [0, 1], got {self.fuse_weight}")

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """Plain CAMs; the extractor is kept because :meth:`refine` reads its model's stages."""
        self._extractor = super().extractor(model, modules, **kwargs)
        return self._extractor

    def stage_features(self, image: Tensor, domain: DomainPlugin, normalized: Tensor | None = None) -> Tensor:
        """``1 x D x h x w`` features of stage ``self.stage`` for a raw ``3 x H x W`` image in [0, 1].

        ``normalized``: the classifier's input the engine already made of it (else made here).
        """
        if self._extractor is None or self.mean is None or self.std is None:
            raise RuntimeError("cam-proto: call setup() and extractor() before refine (the engine does)")
        device = next(self._extractor.model.parameters()).device
        x = normalized if normalized is not None else normalize(domain.preprocess(image), self.mean, self.std)
        x = x.to(device)
        return self._extractor.stage_features(x, self.stage)

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        label_space = context.label_space
        keep = context.present.bool().to(cams.device)
        if not keep.any() or self.fuse_weight == 0.0:
            return cams
        pseudo = cams_to_labels(cams, context.present, label_space, context.bg_threshold, context.exclude)
        channels = label_channels(pseudo, label_space)
        scored = pseudo != label_space.ignore_index
        seeds = confident_seeds(cams, channels, scored, self.seed_fraction) & keep[:, None, None]
        feats = self.stage_features(context.image, context.domain, context.normalized).to(cams.device)
        weights = F.interpolate(seeds[None].float(), size=feats.shape[-2:], mode="area")
        protos, valid = masked_average(feats, weights)
        valid = valid[0] & keep
        if not valid.any():
            return cams
        proto = prototype_cams(feats, protos, valid[None])[0]
        return fuse_prototype_cams(cams, proto, valid, self.fuse_weight)
