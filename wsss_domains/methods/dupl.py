"""DuPL: dual students with trustworthy progressive learning (Wu et al., CVPR 2024), on CNNs.

Why: a network that learns segmentation from pseudo-labels made from its own CAMs confirms its own
mistakes. DuPL trains two students whose features are pushed apart (a discrepancy loss), each
segmentation head learning from the *other* student's PAR-refined CAM pseudo-labels, and ignores
pseudo-labels whose loss a two-component Gaussian mixture marks as noise.

Checked against Wu0409/DuPL (``train_final_voc.py``, ``model/model_dupl.py``, ``utils/cam_helper.py``):

* two complete students (backbone, CAM classifier, LargeFOV segmentation head), both from the same
  pretrained weights: student 1 is the engine's classifier, student 2 a copy of its backbone with a
  fresh CAM head (extra modules ``backbone2`` and ``head2``, trained at the backbone's / head's
  learning rate); the heads are ``seg1`` and ``seg2``;
* classification loss of both students;
* discrepancy: ``(1 + mean cos(f1.detach(), f2)) + (1 + mean cos(f2.detach(), f1))``, the cosine taken
  along the flattened spatial axis of each feature channel (``CosineSimilarity(dim=-1, eps=1e-6)`` on
  ``B x C x hw``), weight 0.1;
* after the CAM warm-up (2000 of 20000 iterations: ``cam_phase`` = 0.1 of the budget): pseudo-labels
  from each student's multi-scale CAMs (1.0, 0.5, 1.5 with mirrors) masked by the image labels and
  refined by PAR with background scores 0.7 / 0.25 (``wsss_domains.methods.online_labels``); the
  segmentation loss (weight 0.2) trains ``seg1`` on student 2's labels and ``seg2`` on student 1's;
* from 8000 of 20000 iterations (``gmm_phase`` = 0.4): each student's labels lose the pixels that
  the GMM filter (``wsss_domains.methods.gmm``) flags from that student's own segmentation loss on them;
* pseudo-labels at the end: student 1's CAMs (``tools/infer_cam_voc.py`` uses branch 1).

Not reproduced: the auxiliary classifier with ToCo's patch-token contrast on an intermediate ViT
layer, the class-wise threshold schedule tuned to VOC's classes (a fixed 0.7 is used, the schedule's
start), and the consistency regularisation on RandAugment-perturbed images (weight 0.05). CNN
backbones replace the official ViT.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.methods.base import Method
from wsss_domains.methods.gmm import GAMMA, MIN_GAP, MIN_PIXELS, noisy_pixels
from wsss_domains.methods.online_labels import (
    CAM_SCALES,
    IGNORE_INDEX,
    multi_scale_cams,
    refined_labels,
    segmentation_loss,
)
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.seg_head import LARGEFOV_CHANNELS, LargeFov
from wsss_domains.refine.background import TOCO_HIGH_THRESHOLD, TOCO_LOW_THRESHOLD
from wsss_domains.refine.par import PixelAdaptiveRefiner

CAM_PHASE = 0.1
GMM_PHASE = 0.4
SEG_WEIGHT = 0.2
DISCREPANCY_WEIGHT = 0.1


def discrepancy_loss(features: Tensor, other: Tensor, eps: float = 1e-6) -> Tensor:
    """DuPL's feature discrepancy: each student's features pushed from the other's (detached) ones."""
    a, b = features.flatten(2), other.flatten(2)
    return (1 + F.cosine_similarity(a.detach(), b, dim=-1, eps=eps).mean()) + (
        1 + F.cosine_similarity(b.detach(), a, dim=-1, eps=eps).mean()
    )


@register_method
class Dupl(Method):
    deviations = (
        "CNN students instead of ViTs; no auxiliary classifier with patch-token contrast; a fixed 0.7 high"
        " threshold instead of the class-wise cosine-descent schedule; no RandAugment consistency loss"
    )
    name = "dupl"
    description = (
        "DuPL (Wu et al., CVPR 2024): two CNN students with a feature discrepancy loss, each "
        "segmentation head trained on the other's PAR-refined CAM labels, GMM noisy-label filter."
    )
    backbone_modules = ("backbone2",)

    def __init__(
        self,
        cam_phase: float = CAM_PHASE,
        gmm_phase: float = GMM_PHASE,
        seg_weight: float = SEG_WEIGHT,
        discrepancy_weight: float = DISCREPANCY_WEIGHT,
        high_threshold: float = TOCO_HIGH_THRESHOLD,
        low_threshold: float = TOCO_LOW_THRESHOLD,
        cam_scales: Sequence[float] = CAM_SCALES,
        gamma: float = GAMMA,
        gmm_min_pixels: int = MIN_PIXELS,
        gmm_min_gap: float = MIN_GAP,
        seg_channels: int = LARGEFOV_CHANNELS,
    ) -> None:
        if not 0 <= cam_phase <= gmm_phase <= 1:
            raise ValueError("need 0 <= cam_phase <= gmm_phase <= 1 (shares of the training budget)")
        if not 0 < low_threshold < high_threshold < 1:
            raise ValueError("need 0 < low_threshold < high_threshold < 1")
        super().__init__(
            cam_phase=cam_phase,
            gmm_phase=gmm_phase,
            seg_weight=seg_weight,
            discrepancy_weight=discrepancy_weight,
            high_threshold=high_threshold,
            low_threshold=low_threshold,
            cam_scales=list(cam_scales),
            gamma=gamma,
            gmm_min_pixels=gmm_min_pixels,
            gmm_min_gap=gmm_min_gap,
            seg_channels=seg_channels,
        )
        self.cam_phase, self.gmm_phase = float(cam_phase), float(gmm_phase)
        self.seg_weight, self.discrepancy_weight = float(seg_weight), float(discrepancy_weight)
        self.high, self.low = float(high_threshold), float(low_threshold)
        self.cam_scales = tuple(float(s) for s in cam_scales)
        self.gamma, self.gmm_min_pixels, self.gmm_min_gap = (
            float(gamma),
            int(gmm_min_pixels),
            float(gmm_min_gap),
        )
        self.seg_channels = int(seg_channels)
        self.refiner = PixelAdaptiveRefiner(downscale=2)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        dim, k = model.backbone.num_features, model.num_classes
        return nn.ModuleDict(
            {
                "backbone2": copy.deepcopy(model.backbone),
                "head2": nn.Conv2d(dim, k, kernel_size=1, bias=False),
                "seg1": LargeFov(dim, k + 1, self.seg_channels),
                "seg2": LargeFov(dim, k + 1, self.seg_channels),
            }
        )

    def pseudo_labels(self, image: Tensor, cams: Tensor, labels: Tensor) -> Tensor:
        """PAR-refined dual-threshold labels of one student's multi-scale CAMs (``B x H x W``)."""
        return refined_labels(
            image, cams * labels[:, :, None, None], labels, self.refiner, self.high, self.low
        )

    def filtered(self, seg: Tensor, target: Tensor) -> Tensor:
        """``target`` with the pixels the GMM filter flags (from ``seg``'s loss on them) ignored."""
        losses = F.cross_entropy(seg.detach(), target, ignore_index=IGNORE_INDEX, reduction="none")
        noisy = noisy_pixels(
            losses,
            target,
            ignore_index=IGNORE_INDEX,
            gamma=self.gamma,
            min_pixels=self.gmm_min_pixels,
            min_gap=self.gmm_min_gap,
        )
        return target.masked_fill(noisy, IGNORE_INDEX)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        backbone2, head2 = modules["backbone2"], modules["head2"]
        features1 = outputs["features"]
        features2 = backbone2.forward_features(image)
        losses = {
            "cls2": F.binary_cross_entropy_with_logits(model.pool(head2(features2)), labels),
            "discrepancy": self.discrepancy_weight * discrepancy_loss(features1, features2),
        }
        if float(batch["progress"]) < self.cam_phase:
            return losses
        cams1 = multi_scale_cams(lambda x: model.head(model.features(x)), image, self.cam_scales)
        cams2 = multi_scale_cams(lambda x: head2(backbone2.forward_features(x)), image, self.cam_scales)
        target1, target2 = self.pseudo_labels(image, cams1, labels), self.pseudo_labels(image, cams2, labels)
        size = image.shape[-2:]
        seg1 = F.interpolate(modules["seg1"](features1), size=size, mode="bilinear", align_corners=False)
        seg2 = F.interpolate(modules["seg2"](features2), size=size, mode="bilinear", align_corners=False)
        if float(batch["progress"]) >= self.gmm_phase:
            target1, target2 = self.filtered(seg1, target1), self.filtered(seg2, target2)
        losses["seg"] = self.seg_weight * (
            segmentation_loss(seg1, target2) + segmentation_loss(seg2, target1)
        )
        return losses
