"""``sam-proto``: classifier CAMs fused with prototype CAMs built from SAM segments.

Pseudo-label time only; training is plain CAM. For each image:

1. SAM segments the image (everything mode; CAM boxes for a box-only SAM such as LiteMedSAM);
2. a segment is *confidently* a class when more than ``confidence`` (0.7) of its pixels carry
   that class in the CAM pseudo-label (assembled with the domain's background threshold and
   exclude mask) -- stricter than SEPL's 50 % majority, since a prototype should describe its class,
   not a boundary;
3. the classifier's backbone features (at the training magnification, flip-averaged) are pooled over
   the union of each class's confident segments into a class prototype;
4. the prototype CAM is the ReLU'd cosine similarity of every pixel feature to the prototype,
   max-normalised (:func:`~wsss_domains.sam.prototypes.prototype_cams`);
5. for each present class with a prototype, ``cam' = norm((1 - w) * cam + w * proto_cam)`` with
   ``w = fuse_weight`` (0.5) and ``norm`` the per-class max normalisation every CAM gets; classes
   without a confident segment keep their CAM. The labels are then assembled as for plain CAM.

The domain decides whether SAM-derived prototypes are used at all (``SamStrategy.use_prototypes``;
option ``use_prototypes`` overrides it): when off, the CAMs pass through unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from wsss_domains.cam.extract import CamExtractor, normalize_per_class
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_base import SamMethod
from wsss_domains.pseudo_labels.assemble import cams_to_labels
from wsss_domains.training.data import normalize

log = logging.getLogger(__name__)

FUSE_WEIGHT = 0.5
CONFIDENCE = 0.7


def fuse_prototype_cams(
    cams: Tensor, proto_cams: Tensor, valid: Tensor, weight: float = FUSE_WEIGHT
) -> Tensor:
    """``K x H x W`` CAMs where ``valid`` classes become ``norm((1 - w) * cam + w * proto_cam)``.

    ``proto_cams`` (``K x h x w``, resized bilinearly to the CAMs) and ``cams`` are in [0, 1];
    ``norm`` divides each class map by its maximum. Classes not ``valid`` are returned unchanged.
    """
    from wsss_domains.sam.prototypes import fuse_cams

    out = cams.clone()
    keep = valid.bool().to(cams.device)
    if keep.any():
        fused = fuse_cams(cams[None], proto_cams[None].to(cams.device), weight)[0]
        out[keep] = normalize_per_class(fused[keep])
    return out


def segment_channels(segment_ids: Tensor, label_space: LabelSpace) -> Tensor:
    """Label-space class ids of segments (-1: none) as CAM channel indices (-1: none or background)."""
    table = torch.full((label_space.num_classes,), -1, dtype=torch.int64, device=segment_ids.device)
    table[list(label_space.foreground)] = torch.arange(len(label_space.foreground), device=segment_ids.device)
    return torch.where(segment_ids >= 0, table[segment_ids.clamp_min(0)], torch.full_like(segment_ids, -1))


@register_method
class SamProto(SamMethod):
    name = "sam-proto"
    description = (
        "CAM fused with prototype CAMs: backbone features pooled over SAM segments the CAM pseudo-label"
        " confidently labels (fuse_weight 0.5). Needs a SAM checkpoint."
    )

    def __init__(
        self,
        fuse_weight: float = FUSE_WEIGHT,
        confidence: float = CONFIDENCE,
        use_prototypes: bool | None = None,
        **sam_options: Any,
    ) -> None:
        super().__init__(
            fuse_weight=fuse_weight, confidence=confidence, use_prototypes=use_prototypes, **sam_options
        )
        self._extractor: CamExtractor | None = None
        self._warned_off = False

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """Plain CAMs; the extractor is kept because :meth:`refine` pools its model's features."""
        self._extractor = super().extractor(model, modules, **kwargs)
        return self._extractor

    @property
    def fuse_weight(self) -> float:
        return float(self.options.get("fuse_weight", FUSE_WEIGHT))

    @property
    def confidence(self) -> float:
        return float(self.options.get("confidence", CONFIDENCE))

    def use_prototypes(self, domain: DomainPlugin) -> bool:
        choice = self.options.get("use_prototypes")
        return bool(self.strategy(domain).use_prototypes if choice is None else choice)

    @torch.no_grad()
    def features(self, image: Tensor, domain: DomainPlugin, normalized: Tensor | None = None) -> Tensor:
        """``1 x D x h x w`` backbone features of a raw image, as the classifier saw it in training
        (``normalized``: the classifier input the engine already made of it)."""
        if self._extractor is None or self.mean is None or self.std is None:
            raise RuntimeError("sam-proto: call setup() and extractor() before refine (the engine does)")
        extractor = self._extractor
        if normalized is None:
            normalized = normalize(domain.preprocess(image), self.mean, self.std)
        x = extractor.training_view(normalized.to(image.device))
        feats = extractor.model.features(x)
        if extractor.flip:
            feats = (feats + extractor.model.features(x.flip(-1)).flip(-1)) / 2
        return feats.float()

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        from wsss_domains.sam.prototypes import class_prototypes, prototype_cams
        from wsss_domains.sam.sepl_merge import sepl_assign

        image, present = context.image, context.present
        domain, label_space = context.domain, context.label_space
        if not self.use_prototypes(domain):
            if not self._warned_off:
                log.warning(
                    "sam-proto: domain '%s' turns SAM-derived prototypes off; CAMs unchanged", domain.name
                )
                self._warned_off = True
            return cams
        keep = present.bool().to(cams.device)
        if not keep.any():
            return cams
        pseudo = cams_to_labels(cams, present, label_space, context.bg_threshold, context.exclude)
        masks = self.segments(image, cams, present, domain).to(cams.device)
        if masks.shape[0] == 0:
            return cams
        ids = sepl_assign(
            pseudo,
            masks,
            label_space.num_classes,
            ignore_index=label_space.ignore_index,
            background_index=label_space.background_index,
            majority=self.confidence,
            coverage=float("inf"),  # confidence means purity only: no claim by covering a region
        )
        channels = segment_channels(ids, label_space)
        feats = self.features(image, domain, context.normalized).to(cams.device)
        protos, valid = class_prototypes(feats, masks[None], channels[None], cams.shape[0])
        valid = valid[0] & keep
        proto = prototype_cams(feats, protos, valid[None])[0]
        return fuse_prototype_cams(cams, proto, valid, self.fuse_weight)
