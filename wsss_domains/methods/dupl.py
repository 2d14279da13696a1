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
  refined by PAR with background scores ``high`` / 0.25 (``wsss_domains.methods.online_labels``);
  the segmentation loss (weight 0.2) trains ``seg1`` on student 2's labels and ``seg2`` on student 1's;
* class-wise high threshold (``threshold_schedule="cosine"``, the default): each class's score falls
  from 0.7 to its target by ``utils/train_helper.py::cosine_descent`` over the iterations after the
  warm-up, ``start + (target - start) (1 - cos(pi t)) / 2`` with ``t`` the share of that phase spent
  (official ``step / (num_steps - 1)``), and each image uses the largest threshold of its present
  classes (``train_final_voc.py``: ``high_thres_i = max(high_thres[present])``). Targets: the official
  VOC list (0.70 for aeroplane, bicycle, bird, boat, chair, train; 0.55 for the others) when the
  domain's classes are VOC's 20, else 0.55 for every class (``train_final_coco.py``'s target), or
  ``class_high_targets``; ``threshold_schedule="fixed"`` keeps 0.7 throughout (the module before);
* from 8000 of 20000 iterations (``gmm_phase`` = 0.4): each student's labels lose the pixels that
  the GMM filter (``wsss_domains.methods.gmm``) flags from that student's own segmentation loss on them;
* from the same point, the consistency loss (weight 0.05): each image is perturbed by the official
  ``utils/randomaug.py`` RandAugment (5 operations drawn with replacement from AutoContrast,
  Equalize, Posterize, Color, Contrast, Brightness, Sharpness at magnitude 10 of 30; the list is
  photometric only, so it is rebuilt from torchvision's functional ops rather than
  ``torchvision.transforms.RandAugment``, whose list and magnitudes differ), mirrored and resized by
  0.75; each head's logits on it, mirrored back and resized to the input, learn by cross-entropy the
  arg-max of its own clean prediction where the labels it learns from (the other student's, after
  the GMM filter) are ignored and that prediction's softmax maximum exceeds 0.9, summed and divided
  by the number of such pixels;
* pseudo-labels at the end: student 1's CAMs (``tools/infer_cam_voc.py`` uses branch 1), as
  ``utils/cam_helper.py::multi_scale_cam2_siamese`` makes them: at each scale the image's and its
  mirror's rectified maps merged by their maximum, summed over scales, then per class shifted by
  the minimum and divided by the maximum (``cam + max_pool(-cam)``, ``cam / (max + 1e-5)``).

Not reproduced: the auxiliary classifier with ToCo's patch-token contrast on an intermediate ViT
layer (weight 0.2, also its classification losses). CNN backbones replace the official ViT. The
RandAugment image is built from the normalised batch with the run's mean and std and rounded to
8 bits (the official code truncates, via ``denormalize_img`` and ``ToPILImage``); torchvision's
Color and Contrast differ from PIL's by at most one grey level (rounding), the other ops match.
At pseudo-label time the scales and the background threshold are the run's (``infer_cam_voc.py``:
scales 1.0, 0.5, 1.5 of the image resized to 448x448, background at 0.5), so that every method of a
matrix is read at one threshold; each scale's mirrors are merged at that scale's size, then resized
to the image (official: resized first). The threshold schedule follows ``train_final_voc.py`` (start 0.7 from the warm-up's end); ``train_final_coco.py`` starts at 0.65 and
from iteration 12000 of 80000 (its warm-up ends at 8000).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from wsss_domains.cam.extract import CamExtractor, min_max_per_class
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
# train_final_voc.py: high_thres_target, in VOC's class order; train_final_coco.py: 0.55 for all.
VOC_HIGH_TARGETS = {
    "aeroplane": 0.70,
    "bicycle": 0.70,
    "bird": 0.70,
    "boat": 0.70,
    "bottle": 0.55,
    "bus": 0.55,
    "car": 0.55,
    "cat": 0.55,
    "chair": 0.70,
    "cow": 0.55,
    "diningtable": 0.55,
    "dog": 0.55,
    "horse": 0.55,
    "motorbike": 0.55,
    "person": 0.55,
    "pottedplant": 0.55,
    "sheep": 0.55,
    "sofa": 0.55,
    "train": 0.70,
    "tvmonitor": 0.55,
}
HIGH_TARGET = 0.55
CONSISTENCY_WEIGHT = 0.05
CONSISTENCY_CONFIDENCE = 0.9
RANDAUG_OPS = 5  # imutils.augment_data_strong(..., n=5, m=10)
RANDAUG_MAGNITUDE = 10
AUG_SCALE = 0.75  # model_dupl.siamese_network.forward(need_sp=True)
# utils/randomaug.py augment_list(): (operation, min, max); value = m / 30 * (max - min) + min.
RANDAUG_LIST = (
    ("autocontrast", 0.0, 1.0),
    ("equalize", 0.0, 1.0),
    ("posterize", 0.0, 6.0),
    ("color", 0.1, 1.9),
    ("contrast", 0.1, 1.9),
    ("brightness", 0.1, 1.9),
    ("sharpness", 0.1, 1.9),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def discrepancy_loss(features: Tensor, other: Tensor, eps: float = 1e-6) -> Tensor:
    """DuPL's feature discrepancy: each student's features pushed from the other's (detached) ones."""
    a, b = features.flatten(2), other.flatten(2)
    return (1 + F.cosine_similarity(a.detach(), b, dim=-1, eps=eps).mean()) + (
        1 + F.cosine_similarity(b.detach(), a, dim=-1, eps=eps).mean()
    )


def cosine_descent(start: Tensor, target: Tensor, fraction: float) -> Tensor:
    """``train_helper.cosine_descent`` with ``fraction`` = ``step / (num_steps - 1)``.

    ``start`` before the phase (``fraction <= 0``), ``target`` at and after its end (``>= 1``).
    """
    if fraction <= 0:
        return start
    if fraction >= 1:
        return target
    return start + (target - start) * (1 - math.cos(math.pi * fraction)) / 2


def image_thresholds(class_thresholds: Tensor, labels: Tensor, default: float) -> Tensor:
    """``B``: the largest threshold among each image's present classes (``default`` when none)."""
    masked = class_thresholds.to(labels.device).expand_as(labels).masked_fill(labels <= 0, -math.inf)
    highest = masked.amax(dim=1)
    return torch.where(torch.isfinite(highest), highest, torch.full_like(highest, default))


def randaugment_value(minimum: float, maximum: float, magnitude: int) -> float:
    """``randomaug.RandAugment``: ``(m / 30) * (max - min) + min``."""
    return (float(magnitude) / 30) * float(maximum - minimum) + minimum


def apply_randaugment_op(image: Tensor, op: str, value: float) -> Tensor:
    """One operation of the official list on a ``3 x H x W`` uint8 image (PIL semantics)."""
    if op == "autocontrast":
        return TF.autocontrast(image)
    if op == "equalize":
        return TF.equalize(image)
    if op == "posterize":
        return TF.posterize(image, max(1, int(value)))
    if op == "color":
        return TF.adjust_saturation(image, value)
    if op == "contrast":
        return TF.adjust_contrast(image, value)
    if op == "brightness":
        return TF.adjust_brightness(image, value)
    if op == "sharpness":
        return TF.adjust_sharpness(image, value)
    raise ValueError(f"unknown RandAugment operation '{op}'")


@torch.no_grad()
def strong_augment(
    images: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    n: int = RANDAUG_OPS,
    magnitude: int = RANDAUG_MAGNITUDE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``imutils.augment_data_strong``: per image, ``n`` operations drawn with replacement from the
    official list at ``magnitude``, then normalised again and mirrored (``B x 3 x H x W`` in and out)."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    pixels = ((images * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    out = torch.empty_like(images)
    for i in range(images.shape[0]):
        image = pixels[i]
        for k in torch.randint(len(RANDAUG_LIST), (n,), generator=generator).tolist():
            op, low, high = RANDAUG_LIST[k]
            image = apply_randaugment_op(image, op, randaugment_value(low, high, magnitude))
        out[i] = image.to(images.dtype) / 255
    return ((out - m) / s).flip(-1)


def align_augmented(seg_aug: Tensor, size: Sequence[int]) -> Tensor:
    """Logits of the mirrored, resized view mirrored back and resized to ``size`` (the clean view)."""
    return F.interpolate(seg_aug.flip(-1), size=tuple(size), mode="bilinear", align_corners=False)


def consistency_loss(
    seg_aug: Tensor,
    seg: Tensor,
    target: Tensor,
    confidence: float = CONSISTENCY_CONFIDENCE,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """DuPL's regularisation: ``seg_aug`` (logits on the perturbed view, aligned with ``seg``) learns
    ``seg``'s arg-max where ``target`` (the labels ``seg`` learns from) is ignored and ``seg`` is
    confident; the summed cross-entropy divided by the number of those pixels, 0 when none."""
    clean = seg.detach()
    pseudo = clean.argmax(dim=1)
    uncertain = (target == ignore_index) & (clean.softmax(dim=1).amax(dim=1) > confidence)
    if not uncertain.any():
        return seg_aug.sum() * 0.0
    pseudo = pseudo.masked_fill(~uncertain, ignore_index)
    losses = F.cross_entropy(seg_aug, pseudo, ignore_index=ignore_index, reduction="none")
    return losses.sum() / uncertain.sum()


class DuplCamExtractor(CamExtractor):
    """``multi_scale_cam2_siamese``'s maps: mirrors merged by their maximum, summed maps min-max scaled."""

    def merge_flips(self, maps: Tensor, mirrored: Tensor) -> Tensor:
        return torch.maximum(maps, mirrored)

    def normalize(self, total: Tensor) -> Tensor:
        return min_max_per_class(total) if self.normalization == "max" else super().normalize(total)


@register_method
class Dupl(Method):
    deviations = (
        "CNN students instead of ViTs; no auxiliary classifier with patch-token contrast (its"
        " classification losses and PTC, weight 0.2); RandAugment rebuilt from torchvision's functional"
        " ops on 8-bit images (rounded, not truncated); the threshold schedule of train_final_voc.py"
        " (start 0.7 after the warm-up) also on COCO, whose official script starts at 0.65 from"
        " iteration 12000; targets other than VOC's are 0.55 for every class; pseudo-labels at the"
        " run's scales and background threshold (infer_cam_voc.py: 1.0, 0.5, 1.5 at 448x448, 0.5)"
    )
    name = "dupl"
    description = (
        "DuPL (Wu et al., CVPR 2024): two CNN students with a feature discrepancy loss, each "
        "segmentation head trained on the other's PAR-refined CAM labels (class-wise cosine-descent "
        "threshold), GMM noisy-label filter, RandAugment consistency."
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
        threshold_schedule: Literal["cosine", "fixed"] = "cosine",
        high_threshold_target: float = HIGH_TARGET,
        class_high_targets: list[float] | None = None,
        cam_scales: Sequence[float] = CAM_SCALES,
        gamma: float = GAMMA,
        gmm_min_pixels: int = MIN_PIXELS,
        gmm_min_gap: float = MIN_GAP,
        consistency_weight: float = CONSISTENCY_WEIGHT,
        consistency_confidence: float = CONSISTENCY_CONFIDENCE,
        randaugment_ops: int = RANDAUG_OPS,
        randaugment_magnitude: int = RANDAUG_MAGNITUDE,
        seg_channels: int = LARGEFOV_CHANNELS,
    ) -> None:
        if not 0 <= cam_phase <= gmm_phase <= 1:
            raise ValueError("need 0 <= cam_phase <= gmm_phase <= 1 (shares of the training budget)")
        if not 0 < low_threshold < high_threshold < 1:
            raise ValueError("need 0 < low_threshold < high_threshold < 1")
        if threshold_schedule not in ("cosine", "fixed"):
            raise ValueError(f"threshold_schedule is 'cosine' or 'fixed', not {threshold_schedule!r}")
        targets = [high_threshold_target] if class_high_targets is None else list(class_high_targets)
        if not all(low_threshold < t < 1 for t in targets):
            raise ValueError("need low_threshold < each high threshold target < 1")
        if randaugment_ops < 0 or not 0 <= randaugment_magnitude <= 30:
            raise ValueError("need randaugment_ops >= 0 and 0 <= randaugment_magnitude <= 30")
        super().__init__(
            cam_phase=cam_phase,
            gmm_phase=gmm_phase,
            seg_weight=seg_weight,
            discrepancy_weight=discrepancy_weight,
            high_threshold=high_threshold,
            low_threshold=low_threshold,
            threshold_schedule=threshold_schedule,
            high_threshold_target=high_threshold_target,
            class_high_targets=None if class_high_targets is None else list(class_high_targets),
            cam_scales=list(cam_scales),
            gamma=gamma,
            gmm_min_pixels=gmm_min_pixels,
            gmm_min_gap=gmm_min_gap,
            consistency_weight=consistency_weight,
            consistency_confidence=consistency_confidence,
            randaugment_ops=randaugment_ops,
            randaugment_magnitude=randaugment_magnitude,
            seg_channels=seg_channels,
        )
        self.cam_phase, self.gmm_phase = float(cam_phase), float(gmm_phase)
        self.seg_weight, self.discrepancy_weight = float(seg_weight), float(discrepancy_weight)
        self.high, self.low = float(high_threshold), float(low_threshold)
        self.schedule = threshold_schedule
        self.high_target = float(high_threshold_target)
        self.custom_targets = None if class_high_targets is None else [float(t) for t in class_high_targets]
        self.cam_scales = tuple(float(s) for s in cam_scales)
        self.gamma, self.gmm_min_pixels, self.gmm_min_gap = (
            float(gamma),
            int(gmm_min_pixels),
            float(gmm_min_gap),
        )
        self.consistency_weight = float(consistency_weight)
        self.consistency_confidence = float(consistency_confidence)
        self.randaugment_ops, self.randaugment_magnitude = int(randaugment_ops), int(randaugment_magnitude)
        self.seg_channels = int(seg_channels)
        self.refiner = PixelAdaptiveRefiner(downscale=2)

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: object) -> CamExtractor:
        """Student 1's CAMs as ``tools/infer_cam_voc.py`` reads them (see :class:`DuplCamExtractor`)."""
        return DuplCamExtractor(model, **kwargs)  # type: ignore[arg-type]

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

    def _class_names(self, num_classes: int) -> tuple[str, ...] | None:
        """The domain's foreground class names when one of its fixed label spaces has ``num_classes``."""
        if self.domain is None:
            return None
        for spec in self.domain.datasets().values():
            if spec.label_space_from is not None:
                continue
            space = spec.label_space
            names = tuple(space.classes[i] for i in space.foreground)
            if len(names) == num_classes:
                return names
        return None

    def class_targets(self, num_classes: int) -> Tensor:
        """``K`` targets of the schedule: ``class_high_targets``, VOC's official list, or 0.55 each."""
        if self.custom_targets is not None:
            if len(self.custom_targets) != num_classes:
                raise ValueError(
                    f"class_high_targets has {len(self.custom_targets)} values for {num_classes} classes"
                )
            return torch.tensor(self.custom_targets)
        if self._class_names(num_classes) == tuple(VOC_HIGH_TARGETS):
            return torch.tensor(list(VOC_HIGH_TARGETS.values()))
        return torch.full((num_classes,), self.high_target)

    def high_thresholds(self, labels: Tensor, progress: float) -> Tensor:
        """``B`` high background scores: ``train_final_voc.py``'s class-wise cosine descent, or fixed."""
        if self.schedule == "fixed":
            return torch.full((labels.shape[0],), self.high, device=labels.device)
        k = labels.shape[1]
        fraction = (progress - self.cam_phase) / (1 - self.cam_phase) if self.cam_phase < 1 else 0.0
        start = torch.full((k,), self.high)
        return image_thresholds(cosine_descent(start, self.class_targets(k), fraction), labels, self.high)

    def pseudo_labels(self, image: Tensor, cams: Tensor, labels: Tensor, high: Tensor) -> Tensor:
        """PAR-refined dual-threshold labels of one student's multi-scale CAMs (``B x H x W``)."""
        return refined_labels(image, cams * labels[:, :, None, None], labels, self.refiner, high, self.low)

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

    def augmented_view(self, image: Tensor) -> Tensor:
        """The perturbed view the consistency loss uses: RandAugment, mirror, resize by 0.75."""
        mean = self.mean if self.mean is not None else IMAGENET_MEAN
        std = self.std if self.std is not None else IMAGENET_STD
        aug = strong_augment(image, mean, std, self.randaugment_ops, self.randaugment_magnitude)
        return F.interpolate(aug, scale_factor=AUG_SCALE, mode="bilinear", align_corners=False)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        progress = float(batch["progress"])
        backbone2, head2 = modules["backbone2"], modules["head2"]
        features1 = outputs["features"]
        features2 = backbone2.forward_features(image)
        losses = {
            "cls2": F.binary_cross_entropy_with_logits(model.pool(head2(features2)), labels),
            "discrepancy": self.discrepancy_weight * discrepancy_loss(features1, features2),
        }
        if progress < self.cam_phase:
            return losses
        cams1 = multi_scale_cams(lambda x: model.head(model.features(x)), image, self.cam_scales)
        cams2 = multi_scale_cams(lambda x: head2(backbone2.forward_features(x)), image, self.cam_scales)
        high = self.high_thresholds(labels, progress)
        target1 = self.pseudo_labels(image, cams1, labels, high)
        target2 = self.pseudo_labels(image, cams2, labels, high)
        size = image.shape[-2:]
        seg1 = F.interpolate(modules["seg1"](features1), size=size, mode="bilinear", align_corners=False)
        seg2 = F.interpolate(modules["seg2"](features2), size=size, mode="bilinear", align_corners=False)
        late = progress >= self.gmm_phase
        if late:
            target1, target2 = self.filtered(seg1, target1), self.filtered(seg2, target2)
        losses["seg"] = self.seg_weight * (
            segmentation_loss(seg1, target2) + segmentation_loss(seg2, target1)
        )
        if late and self.consistency_weight > 0:
            view = self.augmented_view(image)
            seg1_aug = align_augmented(modules["seg1"](model.features(view)), size)
            seg2_aug = align_augmented(modules["seg2"](backbone2.forward_features(view)), size)
            losses["consistency"] = self.consistency_weight * (
                consistency_loss(seg1_aug, seg1, target2, self.consistency_confidence)
                + consistency_loss(seg2_aug, seg2, target1, self.consistency_confidence)
            )
        return losses
