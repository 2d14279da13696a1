"""Cross-architecture consistency (this toolkit's own method): two backbones of different
architecture trained together, their features aligned in one learned space and their CAMs agreeing.

Why: CNN and ViT (or shallow and deep) classifiers activate different parts of an object, and the
literature fuses their CAMs after training (AND/OR, precision-weighted: ``cam-fusion``). The review
of pseudo-label refinement names aligning the heterogeneous features *during* training as an open
problem. Here each architecture keeps its own classifier, and two losses couple them:

* feature alignment: both feature maps, resampled to the first one's grid, go through a learned
  projection head each (1x1 conv, ReLU, 1x1 conv) into a shared ``proj_dim``-dimensional space; at
  ``pixels`` positions drawn per image, each position's first-architecture embedding must pick out
  the second's embedding of the *same* position among those of the other drawn positions, and
  vice versa (symmetric InfoNCE at ``temperature``). Contrasting positions, rather than pulling the
  two embeddings together, cannot be met by collapsing both projections to a constant;
* CAM consistency: the two architectures' rectified CAMs of each image's labelled classes, each
  divided by its own maximum, agree pixel by pixel (mean absolute difference, SEAM's equivariance
  form across architectures instead of across scales).

Both couplings start after ``warmup`` (a share of the training budget), when the CAMs mean
something. Pseudo-labels come from the fused CAMs (``cams="fused"``: the mean of the two
architectures' CAMs, which the shared classification loss keeps on one logit scale), or from either
architecture alone (``first``, ``second``) for ablations.

The second architecture: any timm backbone (``second_backbone``), with the packaged ImageNet
weights (``second_weights="imagenet"``, EfficientNet-Lite0/1/2 here) or an explicit ``random``
start; timm ViTs are laid out as feature maps (:mod:`wsss_domains.models.vit`). It trains at the
backbone's learning rate, its CAM head at the head's. Or a SAM image encoder
(``second_backbone="sam:lite_medsam"``: LiteMedSAM's TinyViT, pretrained on medical images), frozen
by default, its own CAM head and projection learning on its embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method

if TYPE_CHECKING:
    from wsss_domains.domains.contract import DomainPlugin

FEATURE_WEIGHT = 0.1
CAM_WEIGHT = 1.0
TEMPERATURE = 0.1
PIXELS = 256
PROJ_DIM = 128
WARMUP = 0.1
CAM_SOURCES = ("fused", "first", "second")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def projection_head(in_channels: int, dim: int) -> nn.Sequential:
    """1x1 conv -> ReLU -> 1x1 conv: the usual contrastive projection, per pixel."""
    return nn.Sequential(
        nn.Conv2d(in_channels, dim, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, kernel_size=1),
    )


def draw_positions(
    num_positions: int, pixels: int, batch: int, generator: torch.Generator | None = None
) -> Tensor:
    """``B x n`` distinct flat positions per image (``n = min(pixels, num_positions)``)."""
    n = min(pixels, num_positions)
    return torch.stack([torch.randperm(num_positions, generator=generator)[:n] for _ in range(batch)])


def pixel_contrast(first: Tensor, second: Tensor, positions: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between two embeddings of the same pixels.

    ``first``, ``second``: ``B x D x h x w`` on one grid; ``positions``: ``B x n`` flat indices. Per
    image, the ``n x n`` cosine similarities over ``temperature``; position ``i`` of one architecture
    is the positive of position ``i`` of the other. Mean over images of the two directions' mean
    cross-entropies, halved.
    """
    losses = []
    for a, b, idx in zip(first.flatten(2), second.flatten(2), positions, strict=True):
        za = F.normalize(a[:, idx], dim=0)
        zb = F.normalize(b[:, idx], dim=0)
        logits = za.t() @ zb / temperature
        target = torch.arange(idx.numel(), device=logits.device)
        losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)
    return torch.stack(losses).mean()


def cam_consistency(first: Tensor, second: Tensor, labels: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean absolute difference of the rectified, per-class max-normalised CAMs of labelled classes.

    ``first``, ``second``: raw CAMs ``B x K x h x w`` on one grid; ``labels``: ``B x K`` multi-hot.
    0 when the batch holds no labelled class.
    """

    def normalised(cams: Tensor) -> Tensor:
        cams = F.relu(cams)
        return cams / cams.flatten(2).amax(dim=2).clamp_min(eps)[..., None, None]

    present = labels > 0
    if not present.any():
        return first.sum() * 0.0
    diff = (normalised(first) - normalised(second)).abs().mean(dim=(2, 3))
    return diff[present].mean()


def second_classifier(
    name: str, num_classes: int, weights: str, output_stride: int, pooling: str
) -> nn.Module:
    """A CAM classifier of the second architecture (CNN or timm ViT), with its own weights."""
    from wsss_domains.models.classifier import CamClassifier
    from wsss_domains.models.vit import VitCamClassifier, is_vit_backbone
    from wsss_domains.models.weights import WeightsNotFound

    cls = VitCamClassifier if is_vit_backbone(name) else CamClassifier
    try:
        return cls(num_classes, backbone=name, weights=weights, output_stride=output_stride, pooling=pooling)
    except WeightsNotFound as exc:
        raise WeightsNotFound(
            f"cross-arch's second architecture: {exc} (for the second backbone the option is "
            "--method-option second_weights=PATH, or second_weights=random for a deliberate random start)"
        ) from exc


SAM_PREFIX = "sam:"


class SamEncoderFeatures(nn.Module):
    """A SAM image encoder as the second architecture's feature extractor (``second_backbone="sam:NAME"``).

    The classifier's normalised batch is brought back to [0, 1] (the run's mean and std), min-max
    normalised per image where the SAM expects it (LiteMedSAM), resized to the encoder's square input
    and normalised with SAM's own pixel statistics; the encoder's ``256 x S/16`` (LiteMedSAM: ``S/4``)
    embedding is the feature map. Frozen unless ``trainable``: on a CPU a TinyViT encoder at 256 px
    costs seconds per image, too slow to fine-tune in a CPU budget.
    """

    def __init__(
        self,
        name: str,
        checkpoint: str | None,
        mean: Sequence[float],
        std: Sequence[float],
        trainable: bool = False,
    ) -> None:
        super().__init__()
        from wsss_domains.sam.lite_medsam import EMBED_DIM
        from wsss_domains.sam.registry import create_sam

        loaded = create_sam(name, checkpoint)
        self.encoder = loaded.model.image_encoder
        self.register_buffer("pixel_mean", loaded.model.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", loaded.model.pixel_std.detach().clone(), persistent=False)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.minmax = loaded.minmax_normalise
        self.trainable = trainable
        self.num_features = EMBED_DIM
        self.encoder.requires_grad_(trainable)

    def sam_input(self, x: Tensor) -> Tensor:
        """The encoder's input for a batch normalised with the run's statistics."""
        from wsss_domains.sam.predictor import minmax_255

        image = (x * self.std + self.mean).clamp(0, 1) * 255
        if self.minmax:
            image = minmax_255(image)
        size = int(self.encoder.img_size)
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        return (image - self.pixel_mean.view(1, -1, 1, 1)) / self.pixel_std.view(1, -1, 1, 1)

    def train(self, mode: bool = True) -> SamEncoderFeatures:
        """A frozen encoder stays in eval mode (its batch norms keep their statistics)."""
        super().train(mode)
        if not self.trainable:
            self.encoder.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.encoder(self.sam_input(x))


class FusedCamExtractor(CamExtractor):
    """CAMs of one or both architectures: the mean of the two heads' maps on the first one's grid."""

    def __init__(
        self, model: nn.Module, modules: nn.ModuleDict, source: str = "fused", **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        self.modules = modules
        self.source = source

    def raw_maps(self, batch: Tensor) -> Tensor:
        rectify = self.normalization == "max"
        first = self.model.cams(batch, rectify=rectify)
        if self.source == "first":
            return first
        with torch.no_grad():
            second = self.modules["head2"](self.modules["second"].features(batch))
        second = F.relu(second) if rectify else second
        second = F.interpolate(second, size=first.shape[-2:], mode="bilinear", align_corners=False)
        return second if self.source == "second" else (first + second) / 2


@register_method
class CrossArch(Method):
    name = "cross-arch"
    description = (
        "Cross-architecture consistency (this toolkit's): a second backbone of another architecture "
        "trained beside the classifier, both feature maps projected into one space and aligned by "
        "per-pixel contrast, their CAMs held consistent; pseudo-labels from the fused CAMs."
    )
    deviations = (
        "The toolkit's own design, not a paper's: symmetric pixel InfoNCE between learned projections "
        "and an L1 between max-normalised CAMs of the labelled classes, after a warm-up."
    )
    backbone_modules = ("second",)

    def __init__(
        self,
        second_backbone: str = "tf_efficientnet_lite2",
        second_weights: str = "imagenet",
        second_output_stride: int = 16,
        feature_weight: float = FEATURE_WEIGHT,
        cam_weight: float = CAM_WEIGHT,
        temperature: float = TEMPERATURE,
        pixels: int = PIXELS,
        proj_dim: int = PROJ_DIM,
        warmup: float = WARMUP,
        cams: Literal["fused", "first", "second"] = "fused",
        second_trainable: bool | None = None,
        sam_checkpoint: str | None = None,
    ) -> None:
        if cams not in CAM_SOURCES:
            raise ValueError(f"cams is one of {', '.join(CAM_SOURCES)}, not {cams!r}")
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup is a share of the budget in [0, 1), got {warmup}")
        if temperature <= 0 or pixels < 2 or proj_dim < 1:
            raise ValueError("need temperature > 0, pixels >= 2 and proj_dim >= 1")
        if feature_weight < 0 or cam_weight < 0:
            raise ValueError("loss weights must be >= 0")
        super().__init__(
            second_backbone=second_backbone,
            second_weights=second_weights,
            second_output_stride=second_output_stride,
            feature_weight=feature_weight,
            cam_weight=cam_weight,
            temperature=temperature,
            pixels=pixels,
            proj_dim=proj_dim,
            warmup=warmup,
            cams=cams,
            second_trainable=second_trainable,
            sam_checkpoint=sam_checkpoint,
        )
        self.second_backbone, self.second_weights = second_backbone, second_weights
        self.second_output_stride = int(second_output_stride)
        self.feature_weight, self.cam_weight = float(feature_weight), float(cam_weight)
        self.temperature, self.pixels, self.proj_dim = float(temperature), int(pixels), int(proj_dim)
        self.warmup, self.cams = float(warmup), cams
        # Default: a timm backbone fine-tunes, a SAM encoder stays frozen (see SamEncoderFeatures).
        self.second_trainable = (
            not second_backbone.startswith(SAM_PREFIX) if second_trainable is None else bool(second_trainable)
        )
        self.sam_checkpoint = sam_checkpoint

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        """Fails at once when a SAM second architecture's checkpoint is missing."""
        super().setup(domain, mean, std)
        if self.second_backbone.startswith(SAM_PREFIX):
            from wsss_domains.sam.registry import resolve_checkpoint

            resolve_checkpoint(self.second_backbone[len(SAM_PREFIX) :], self.sam_checkpoint)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        if self.second_backbone.startswith(SAM_PREFIX):
            second: nn.Module = SamEncoderFeatures(
                self.second_backbone[len(SAM_PREFIX) :],
                self.sam_checkpoint,
                self.mean or IMAGENET_MEAN,
                self.std or IMAGENET_STD,
                trainable=self.second_trainable,
            )
            width = second.num_features
            head2 = nn.Conv2d(width, model.num_classes, kernel_size=1, bias=False)
        else:
            second = second_classifier(
                self.second_backbone,
                model.num_classes,
                self.second_weights,
                self.second_output_stride,
                getattr(model, "pooling", "gap"),
            )
            second.requires_grad_(self.second_trainable)
            width = second.backbone.num_features
            head2 = second.head
            second.head = nn.Identity()  # its CAM head trains at the heads' learning rate, as "head2"
        return nn.ModuleDict(
            {
                "second": second,
                "head2": head2,
                "proj1": projection_head(model.backbone.num_features, self.proj_dim),
                "proj2": projection_head(width, self.proj_dim),
            }
        )

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        features1, cams1 = outputs["features"], outputs["cams"]
        features2 = modules["second"].features(image)
        cams2 = modules["head2"](features2)
        losses = {"cls2": F.binary_cross_entropy_with_logits(model.pool(cams2), labels)}
        if float(batch["progress"]) < self.warmup:
            return losses
        grid = features1.shape[-2:]
        features2 = F.interpolate(features2, size=grid, mode="bilinear", align_corners=False)
        cams2 = F.interpolate(cams2, size=grid, mode="bilinear", align_corners=False)
        positions = draw_positions(grid[0] * grid[1], self.pixels, image.shape[0]).to(image.device)
        if self.feature_weight > 0:
            losses["align"] = self.feature_weight * pixel_contrast(
                modules["proj1"](features1), modules["proj2"](features2), positions, self.temperature
            )
        if self.cam_weight > 0:
            losses["cam_consistency"] = self.cam_weight * cam_consistency(cams1, cams2, labels)
        return losses

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return FusedCamExtractor(model, modules, source=self.cams, **kwargs)
