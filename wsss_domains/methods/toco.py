"""ToCo: token contrast for single-stage WSSS on Vision Transformers (Ru et al., CVPR 2023).

Why: deep ViT layers over-smooth, so every patch token of the last layer looks alike and CAMs blur.
ToCo keeps the final patch tokens apart with patch token contrast (PTC): pairs of tokens whose
intermediate-layer CAM labels agree are pulled together, pairs that disagree pushed apart. Class
token contrast (CTC) pulls the class tokens of local crops from uncertain regions towards the
global views' class tokens when the crop holds enough uncertain area, and pushes the others away.
A segmentation head learns from PAR-refined CAM pseudo-labels after a warm-up.

Checked against rulixiang/ToCo (``scripts/dist_train_voc_seg_neg.py``, ``model/model_seg_neg.py``,
``model/losses.py``, ``utils/camutils.py``, ``datasets/voc.py``):

* classifier on the final patch tokens (the engine's) and an auxiliary one on the tokens of block
  ``aux_layer`` = -3 (extra module ``aux_head``); both classification losses weigh 1;
* CAMs (final and auxiliary) of the batch at scales 1.0, 0.5, 1.5 with mirrors, no gradient
  (``wsss_domains.methods.online_labels.multi_scale_cams``);
* PTC (weight 0.2): labels from the auxiliary CAMs at the token grid (arg-max class where the
  label-masked maximum exceeds 0.7, background at or below 0.25, ignored between); with ``c_ij`` the
  absolute cosine between tokens ``i`` and ``j`` over the batch's pairs of valid, distinct tokens of
  the same image, ``0.5 (1 - sum_same c / (n_same + 1)) + 0.5 sum_diff c / (n_diff + 1)``;
* CTC (weight 0.5, temperature 0.5): a DINO-style projection head on class tokens (3-layer MLP
  2048-2048-256, L2 normalisation, a 1024-way linear layer with unit-norm rows) for the student and
  its momentum copy (0.9, updated before each use) for the teacher; the teacher sees the two global
  views (the input and a random resized crop of scale 0.4-1), the student those and 8 local crops
  (96 px) cut around positions whose auxiliary CAM is not above 0.7 (any position if too few); a local
  crop is a negative when the mean of its region mask (0 below 0.25, 1 between, 2 from 0.7) is at most
  0.2; per image and teacher view, ``-log(e^{l_p} / (e^{l_p} + sum_neg e^{l_n} + 1e-4))`` over the
  positive crops plus ``-log(1 / (1 + sum_neg e^{l_n} + 1e-4))``, summed over both teacher views,
  halved and divided by the number of positives (``CTCLoss_neg``, evaluated in log-space);
* segmentation (weight 0.1 after the first 2000 of 20000 iterations: ``warmup`` = 0.1 of the budget):
  LargeFOV on the final tokens, trained with ToCo's background/foreground-balanced cross-entropy on
  the final CAMs refined by PAR with background scores 0.7 / 0.25;
* pseudo-labels at the end: the final CAMs (``tools/infer_cam.py``).

Not reproduced: the dense-CRF energy loss on the segmentation head (weight 0.05; it needs ToCo's
compiled bilateral filter) and the colour jitter, blur and solarisation of the crops (the engine
hands methods normalised images, so crops are geometric only). ToCo pools with global max pooling:
train with ``--pooling gmp`` to come close (the engine max-pools the CAMs; ToCo max-pools the tokens
and then applies its classifier, the same for average pooling but not for max pooling).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import RandomResizedCrop

from wsss_domains.methods.base import Method
from wsss_domains.methods.online_labels import (
    CAM_SCALES,
    IGNORE_INDEX,
    multi_scale_cams,
    refined_labels,
    segmentation_loss,
)
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.seg_head import LARGEFOV_CHANNELS, LargeFov
from wsss_domains.models.stages import capture_stages
from wsss_domains.models.vit import VitCamClassifier
from wsss_domains.refine.background import TOCO_HIGH_THRESHOLD, TOCO_LOW_THRESHOLD
from wsss_domains.refine.par import PixelAdaptiveRefiner

AUX_LAYER = -3
LOCAL_CROPS = 8
LOCAL_CROP_SIZE = 96
CTC_TEMPERATURE = 0.5
MOMENTUM = 0.9
NEGATIVE_RATIO = 0.2
BACKGROUND_SCORE = 0.5
WEIGHTS = {"ptc": 0.2, "ctc": 0.5, "seg": 0.1}
WARMUP = 0.1


class CtcHead(nn.Module):
    """DINO-style projection head: MLP, L2 normalisation, linear layer with unit-norm weight rows."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last = nn.Linear(bottleneck, out_dim, bias=False)  # weight-normed with its gain fixed at 1

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.last.weight, dim=1))


@torch.no_grad()
def momentum_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def cam_labels(
    cams: Tensor,
    labels: Tensor,
    background: float = BACKGROUND_SCORE,
    high: float = TOCO_HIGH_THRESHOLD,
    low: float = TOCO_LOW_THRESHOLD,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """ToCo's ``cam_to_label`` with ``ignore_mid``: ``B x H x W`` labels (0 background, ``k+1`` class k)."""
    value, index = (cams * labels[:, :, None, None]).max(dim=1)
    out = index + 1
    out[value <= background] = 0
    out[value <= high] = ignore_index
    out[value <= low] = 0
    return out


def affinity_mask(token_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``B x N x N``: 1 where two tokens share a label, 0 where they differ, ignore for ignored or equal tokens."""
    flat = token_labels.flatten(1)
    mask = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = flat == ignore_index
    mask[ignored[:, :, None] | ignored[:, None, :]] = ignore_index
    n = flat.shape[1]
    mask[:, torch.arange(n), torch.arange(n)] = ignore_index
    return mask


def patch_token_contrast(features: Tensor, mask: Tensor) -> Tensor:
    """PTC: absolute token cosines pulled to 1 for same-label pairs and to 0 for different-label pairs."""
    flat = F.normalize(features.flatten(2), dim=1, eps=1e-8)
    cos = (flat.transpose(1, 2) @ flat).abs()
    pos, neg = mask == 1, mask == 0
    return 0.5 * (1 - (cos * pos).sum() / (pos.sum() + 1)) + 0.5 * (cos * neg).sum() / (neg.sum() + 1)


def region_mask(cams: Tensor, labels: Tensor, high: float, low: float) -> Tensor:
    """``cam_to_roi_mask2``: 0 where the label-masked CAM maximum is at most ``low``, 2 from ``high``, else 1."""
    value = (cams * labels[:, :, None, None]).amax(dim=1)
    roi = torch.ones_like(value, dtype=torch.long)
    roi[value <= low] = 0
    roi[value >= high] = 2
    return roi


def local_crops(
    images: Tensor, roi: Tensor, count: int, size: int, negative_ratio: float = NEGATIVE_RATIO
) -> tuple[list[Tensor], Tensor, Tensor]:
    """``crop_from_roi_neg``: ``count`` crops per image around not-confident positions.

    Returns the crops (one ``B x C x size x size`` batch per crop index), the flags ``B x (count+2)``
    (the two global views first, always positive) and the crops' top-left corners ``B x count x 2``.
    """
    b, c, h, w = images.shape
    margin = size // 2
    crops = images.new_zeros(count, b, c, size, size)
    flags = images.new_ones(b, count + 2)
    corners = torch.zeros(b, count, 2, dtype=torch.long)
    for i in range(b):
        inner = roi[i, margin : h - margin, margin : w - margin]
        candidates = (inner <= 1).nonzero()
        if candidates.shape[0] < count:
            candidates = (inner >= 0).nonzero()
        chosen = candidates[torch.randperm(candidates.shape[0])[:count]]
        for j, (y, x) in enumerate(chosen.tolist()):
            crops[j, i] = images[i, :, y : y + size, x : x + size]
            corners[i, j] = torch.tensor([y, x])
            if roi[i, y : y + size, x : x + size].sum() / (size * size) <= negative_ratio:
                flags[i, j + 2] = 0
    return list(crops), flags, corners


def class_token_contrast(student: Tensor, teacher: Tensor, flags: Tensor, temperature: float) -> Tensor:
    """``CTCLoss_neg``: student outputs ``(ncrops*B) x D`` (crop-major), teacher ``(2*B) x D``, flags ``B x ncrops``."""
    b, ncrops = flags.shape
    s = student.reshape(ncrops, b, -1).transpose(0, 1)
    t = teacher.reshape(2, b, -1).transpose(0, 1)
    logits = t @ s.transpose(1, 2) / temperature  # b x 2 x ncrops
    log_eps = torch.full_like(logits[:, :, :1], math.log(1e-4))  # the official + 1e-4 in the denominators
    total = logits.new_zeros(())
    for i in range(b):
        negatives = logits[i][:, flags[i] == 0]
        positives = (flags[i] != 0).nonzero().flatten()
        loss = torch.logsumexp(torch.cat([torch.zeros_like(log_eps[i]), negatives, log_eps[i]], dim=1), dim=1)
        for j in positives.tolist():
            pos = logits[i][:, j : j + 1]
            loss = loss + torch.logsumexp(torch.cat([pos, negatives, log_eps[i]], dim=1), dim=1) - pos[:, 0]
        total = total + loss.sum() / 2 / (positives.numel() + 1e-4)
    return total / b


def global_view(images: Tensor) -> Tensor:
    """The second global view: a random resized crop (scale 0.4-1) at the input size, randomly mirrored."""
    out = torch.empty_like(images)
    size = (images.shape[-2], images.shape[-1])
    for i, image in enumerate(images):
        top, left, h, w = RandomResizedCrop.get_params(image, scale=[0.4, 1.0], ratio=[3 / 4, 4 / 3])
        crop = F.interpolate(
            image[None, :, top : top + h, left : left + w], size=size, mode="bicubic", align_corners=False
        )
        out[i] = crop[0].flip(-1) if torch.rand(()) < 0.5 else crop[0]
    return out


@register_method
class Toco(Method):
    name = "toco"
    description = (
        "ToCo (Ru et al., CVPR 2023), ViT backbones only (--backbone vit_base_patch16_224 --pooling gmp): "
        "patch token contrast guided by an intermediate layer's CAMs, class token contrast between global "
        "views and local crops, segmentation head on PAR-refined CAM labels."
    )

    def __init__(
        self,
        aux_layer: int = AUX_LAYER,
        warmup: float = WARMUP,
        ptc_weight: float = WEIGHTS["ptc"],
        ctc_weight: float = WEIGHTS["ctc"],
        seg_weight: float = WEIGHTS["seg"],
        high_threshold: float = TOCO_HIGH_THRESHOLD,
        low_threshold: float = TOCO_LOW_THRESHOLD,
        background_threshold: float = BACKGROUND_SCORE,
        cam_scales: list[float] | tuple[float, ...] = CAM_SCALES,
        num_local_crops: int = LOCAL_CROPS,
        local_crop_size: int = LOCAL_CROP_SIZE,
        temperature: float = CTC_TEMPERATURE,
        momentum: float = MOMENTUM,
        ctc_dims: list[int] | tuple[int, int, int] = (2048, 256, 1024),
        seg_channels: int = LARGEFOV_CHANNELS,
    ) -> None:
        if not 0 < low_threshold < high_threshold < 1 or not 0 <= warmup <= 1 or not 0 <= momentum < 1:
            raise ValueError(
                "need 0 < low_threshold < high_threshold < 1, 0 <= warmup <= 1, 0 <= momentum < 1"
            )
        super().__init__(
            aux_layer=aux_layer,
            warmup=warmup,
            ptc_weight=ptc_weight,
            ctc_weight=ctc_weight,
            seg_weight=seg_weight,
            high_threshold=high_threshold,
            low_threshold=low_threshold,
            background_threshold=background_threshold,
            cam_scales=list(cam_scales),
            num_local_crops=num_local_crops,
            local_crop_size=local_crop_size,
            temperature=temperature,
            momentum=momentum,
            ctc_dims=list(ctc_dims),
            seg_channels=seg_channels,
        )
        self.aux_layer, self.warmup = int(aux_layer), float(warmup)
        self.weights = {"ptc": float(ptc_weight), "ctc": float(ctc_weight), "seg": float(seg_weight)}
        self.high, self.low, self.background = (
            float(high_threshold),
            float(low_threshold),
            float(background_threshold),
        )
        self.cam_scales = tuple(float(s) for s in cam_scales)
        self.local_count, self.local_size = int(num_local_crops), int(local_crop_size)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.ctc_dims = tuple(int(d) for d in ctc_dims)
        self.seg_channels = int(seg_channels)
        self.refiner = PixelAdaptiveRefiner(downscale=2)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        if not isinstance(model, VitCamClassifier):
            raise ValueError(
                "toco needs a ViT backbone, e.g. --backbone vit_base_patch16_224 (timm ViT or DeiT)"
            )
        dim, k = model.backbone.num_features, model.num_classes
        hidden, bottleneck, out = self.ctc_dims
        projection = CtcHead(dim, out, hidden, bottleneck)
        teacher = copy.deepcopy(projection).requires_grad_(False)
        return nn.ModuleDict(
            {
                "aux_head": nn.Conv2d(dim, k, kernel_size=1, bias=False),
                "projection": projection,
                "projection_teacher": teacher,
                "seg": LargeFov(dim, k + 1, self.seg_channels),
            }
        )

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image = batch["image"]
        with capture_stages(model.backbone, [self.aux_layer]) as captured:
            outputs = model(image)
        return {
            **outputs,
            "aux_features": model.tokens_to_map(captured[0], (image.shape[-2], image.shape[-1])),
        }

    def both_cams(self, model: nn.Module, aux_head: nn.Module, x: Tensor) -> Tensor:
        """Raw final and auxiliary CAMs of a batch, concatenated along the class axis."""
        with capture_stages(model.backbone, [self.aux_layer]) as captured:
            final = model.features(x)
        aux = model.tokens_to_map(captured[0], (x.shape[-2], x.shape[-1]))
        return torch.cat([model.head(final), aux_head(aux)], dim=1)

    def class_tokens(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)["class_token"]

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        k = labels.shape[1]
        aux_head = modules["aux_head"]
        losses = {
            "cls_aux": F.binary_cross_entropy_with_logits(
                model.pool(aux_head(outputs["aux_features"])), labels
            )
        }
        both = multi_scale_cams(lambda x: self.both_cams(model, aux_head, x), image, self.cam_scales)
        cams, cams_aux = both[:, :k], both[:, k:]

        # Patch token contrast, guided by the auxiliary layer's CAMs at the token grid.
        features = outputs["features"]
        grid = F.interpolate(cams_aux, size=features.shape[-2:], mode="bilinear", align_corners=False)
        token_labels = cam_labels(grid, labels, self.background, self.high, self.low)
        losses["ptc"] = self.weights["ptc"] * patch_token_contrast(features, affinity_mask(token_labels))

        # Class token contrast between global views and local crops of uncertain regions.
        size = min(self.local_size, min(image.shape[-2:]) // 2)
        roi = region_mask(cams_aux, labels, self.high, self.low)
        crops, flags, _ = local_crops(image, roi, self.local_count, size)
        if self.first_pass_of_step("teacher", batch):
            momentum_update(modules["projection_teacher"], modules["projection"], self.momentum)
        second = self.class_tokens(model, global_view(image))
        global_tokens = torch.cat([outputs["class_token"], second])
        local_tokens = self.class_tokens(model, torch.cat(crops))
        teacher = modules["projection_teacher"](global_tokens.detach())
        student = modules["projection"](torch.cat([global_tokens, local_tokens]))
        losses["ctc"] = self.weights["ctc"] * class_token_contrast(student, teacher, flags, self.temperature)

        if float(batch["progress"]) >= self.warmup:
            target = refined_labels(
                image, cams * labels[:, :, None, None], labels, self.refiner, self.high, self.low
            )
            seg = F.interpolate(
                modules["seg"](features), size=image.shape[-2:], mode="bilinear", align_corners=False
            )
            losses["seg"] = self.weights["seg"] * segmentation_loss(seg, target)
        return losses
