"""SIPE: self-supervised image-specific prototype exploration (Chen et al., CVPR 2022).

Why: a classifier's weights are one prototype per class for the whole dataset, so its CAM only
lights up the parts typical of the class. SIPE builds prototypes from each image's own features:
seeds are the pixels whose feature neighbourhood overlaps a class's CAM best (structure-aware seed
locating), the prototypes are the mean hierarchical features of the seeds, and the image-specific
CAM (IS-CAM) is the cosine similarity to them. A general-specific consistency (GSC) loss ties the
CAM to the IS-CAM, and pseudo-labels come from the IS-CAM, background included.

Checked against chenqi1126/SIPE (``network/resnet50_SIPE.py``, ``train_resnet50_SIPE.py``,
``make_cam.py``, ``eval_cam.py``):

* normalised CAM: ``relu(cam) / (max + 1e-5)`` per class, background ``1 - max`` prepended; in
  training multiplied by ``[1, labels]``;
* hierarchical features: each of four backbone stages (detached) through a bias-free 1x1 side
  convolution (128, 128, 256, 256 channels), divided by its L2 norm (+1e-5), resized bilinearly to
  the CAM resolution and concatenated;
* seeds: with ``a_ij = relu(cos(f_i, f_j))`` over the final features (training) or the hierarchical
  features (inference), ``IoU_c(i) = sum_j a_ij m_cj / (sum_j a_ij + sum_j m_cj - sum_j a_ij m_cj)``,
  the background IoU halved, each pixel the seed of its arg-max class, seeds of absent classes dropped;
* prototypes: the spatial mean of the seed-masked hierarchical features; IS-CAM: ``relu(cos)`` of the
  hierarchical features with each prototype, background included;
* GSC: ``mean |normalised CAM - IS-CAM / (max + 1e-5)|`` over all channels;
* inference: an image and its mirror are fused at the feature level before seeds are located, the
  IS-CAMs of all scales are summed and divided by their maximum, and a pixel takes the arg-max of the
  background and present classes' IS-CAMs.

The engine decides background by a threshold over foreground maps, so the extractor hands out the
foreground IS-CAMs zeroed wherever the background IS-CAM beats them (option ``background="prototype"``,
the default): with ``--bg-threshold 0`` the pseudo-labels are exactly SIPE's arg-max, and a positive
threshold additionally drops weak foreground. ``background="none"`` returns the plain foreground
IS-CAMs (for domains without a background class).

Deviations (also in :attr:`Sipe.deviations`; ``tests/methods/test_sipe_official.py`` compares the
rest with a transcription of the official code):

* the official network detaches its backbone after ``layer2`` (a ResNet-specific choice); here the
  engine trains the whole backbone;
* no spatial valid mask in training: the official loader zeroes the padded border of a crop in the
  normalised CAM (and so in the seeds); the engine's crops are not padded;
* at inference the seeds of absent classes are kept (the official ``CAM.forward`` drops them); the
  background's and present classes' prototypes and IS-CAMs are the same either way, and the absent
  classes' maps are not used;
* each scale's IS-CAM reaches the image size through the scaled image's size (the engine's
  extractor); ``make_cam.py`` upsamples it to the image in one step;
* hierarchical features are resized to the CAM resolution (official: to stage 3's, which equals the
  CAM's on its stride-16 ResNet-50).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method
from wsss_domains.models.stages import forward_with_stages, stage_channels

SIDE_STAGES = (-4, -3, -2, -1)
SIDE_WIDTHS = (128, 128, 256, 256)
BACKGROUNDS = ("prototype", "none")


def normalized_cam(cams: Tensor) -> Tensor:
    """``B x (K+1) x h x w``: ``relu(cams) / (max + 1e-5)`` per class, background ``1 - max`` first."""
    norm = F.relu(cams)
    norm = norm / (norm.flatten(2).amax(dim=-1)[..., None, None] + 1e-5)
    return torch.cat([1 - norm.amax(dim=1, keepdim=True), norm], dim=1)


def structure_seeds(norm_cam: Tensor, features: Tensor, valid: Tensor | None = None) -> Tensor:
    """One-hot seeds ``B x C x h x w``: each pixel's class of best CAM / feature-neighbourhood IoU.

    ``valid`` (``B x C``, 1 for background and present classes) drops the seeds of other classes.
    """
    b, c, h, w = norm_cam.shape
    flat = features.flatten(2)
    flat = flat / (flat.norm(dim=1, keepdim=True) + 1e-5)
    correlation = F.relu(flat.transpose(1, 2) @ flat)  # B x hw x hw, symmetric
    cam = norm_cam.flatten(2)  # B x C x hw
    inter = cam @ correlation.transpose(1, 2)  # inter[b, c, i] = sum_j a_ij m_cj
    union = correlation.sum(dim=-1)[:, None, :] + cam.sum(dim=-1, keepdim=True) - inter
    iou = (inter / union).view(b, c, h, w)
    iou = torch.cat([iou[:, :1] * 0.5, iou[:, 1:]], dim=1)
    seeds = F.one_hot(iou.argmax(dim=1), c).permute(0, 3, 1, 2).to(norm_cam.dtype)
    if valid is not None:
        seeds = seeds * valid[:, :, None, None]
    return seeds


def image_prototypes(seeds: Tensor, features: Tensor) -> Tensor:
    """``B x C x D``: the spatial mean (over all ``h*w`` pixels) of each class's seed-masked features."""
    if seeds.shape[-2:] != features.shape[-2:]:
        seeds = F.interpolate(seeds, size=features.shape[-2:], mode="nearest")
    return torch.einsum("bchw,bdhw->bcd", seeds, features) / (features.shape[-2] * features.shape[-1])


def is_cam(prototypes: Tensor, features: Tensor, eps: float = 1e-8) -> Tensor:
    """IS-CAM ``B x C x h x w``: rectified cosine similarity of each pixel's feature to each prototype."""
    dot = torch.einsum("bcd,bdhw->bchw", prototypes, features)
    norms = prototypes.norm(dim=-1)[:, :, None, None] * features.norm(dim=1, keepdim=True)
    return F.relu(dot / norms.clamp_min(eps))


def gsc_loss(norm_cam: Tensor, iscam: Tensor) -> Tensor:
    """General-specific consistency: L1 between the CAM and the max-normalised IS-CAM."""
    iscam = iscam / (iscam.flatten(2).amax(dim=-1)[..., None, None] + 1e-5)
    return (norm_cam - iscam).abs().mean()


class SideFeatures(nn.Module):
    """Hierarchical features: stages through 1x1 side convolutions, L2-normalised, resized.

    SIPE detaches the stages; POT (``detach=False, with_image=True``) trains through them and gives
    each side convolution the input image too, resized to the stage (bilinear, aligned corners).
    """

    def __init__(
        self,
        channels: Sequence[int],
        widths: Sequence[int] = SIDE_WIDTHS,
        detach: bool = True,
        with_image: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != len(widths):
            raise ValueError(f"{len(channels)} stages for {len(widths)} side widths")
        extra = 3 if with_image else 0
        self.sides = nn.ModuleList(
            nn.Conv2d(c + extra, w, kernel_size=1, bias=False) for c, w in zip(channels, widths, strict=True)
        )
        self.detach = detach
        self.with_image = with_image

    def forward(self, stages: Sequence[Tensor], size: tuple[int, int], image: Tensor | None = None) -> Tensor:
        if self.with_image and image is None:
            raise ValueError("these side features read the input image: pass image=")
        parts = []
        for side, stage in zip(self.sides, stages, strict=True):
            x = stage.detach() if self.detach else stage
            if self.with_image:
                assert image is not None
                resized = F.interpolate(image, size=x.shape[-2:], mode="bilinear", align_corners=True)
                x = torch.cat([x, resized.to(x.dtype)], dim=1)
            x = side(x)
            x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
            parts.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return torch.cat(parts, dim=1)


def stage_list(outputs: dict[str, Tensor], count: int) -> list[Tensor]:
    return [outputs[f"stage{i}"] for i in range(count)]


class IsCamExtractor(CamExtractor):
    """Multi-scale IS-CAMs (``make_cam.py``); mirror pairs are fused at the feature level, as official."""

    def __init__(
        self,
        model: nn.Module,
        side: SideFeatures,
        stages: Sequence[int],
        background: str = "prototype",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.side = side
        self.stages = tuple(stages)
        self.background = background

    def raw_maps(self, batch: Tensor) -> Tensor:
        """IS-CAMs ``B x (K+1) x h x w``, background first.

        When flipping, the batch is an image and its mirror: like the official ``CAM.forward``, their
        CAMs and hierarchical features are summed (mirror flipped back) before seeds are located, and
        the fused IS-CAM is returned for the image and, mirrored, for the mirror.
        """
        outputs = forward_with_stages(self.model, batch, self.stages)
        cams = outputs["cams"]
        features = self.side(stage_list(outputs, len(self.stages)), (cams.shape[-2], cams.shape[-1]))
        fused = self.flip and batch.shape[0] == 2
        if fused:
            cams = (cams[0] + cams[1].flip(-1))[None]
            features = (features[0] + features[1].flip(-1))[None]
        norm_cam = normalized_cam(cams)
        prototypes = image_prototypes(structure_seeds(norm_cam, features), features)
        maps = is_cam(prototypes, features)
        return torch.cat([maps, maps.flip(-1)]) if fused else maps

    def __call__(self, image: Tensor) -> Tensor:
        """Foreground IS-CAMs ``K x H x W`` in [0, 1]; with the prototype background, zero where it wins."""
        maps = super().__call__(image)
        foreground = maps[1:]
        if self.background == "prototype":
            foreground = foreground.masked_fill(foreground <= maps[:1], 0.0)
        return foreground


@register_method
class Sipe(Method):
    name = "sipe"
    description = (
        "SIPE (Chen et al., CVPR 2022): image-specific prototypes from structure-aware seeds, "
        "general-specific consistency loss; pseudo-labels from the IS-CAM with its background prototype "
        "(use --bg-threshold 0 for SIPE's own arg-max)."
    )

    deviations = (
        "The whole backbone is trained (the official network detaches it after layer2). Training has "
        "no spatial valid mask (official: padded crop borders are zeroed in the CAM and the seeds; the "
        "engine's crops are not padded). Inference keeps the seeds of absent classes (official: "
        "dropped), which leaves the background and present classes' IS-CAMs unchanged, and upsamples "
        "each scale's IS-CAM through the scaled image's size (make_cam.py: straight to the image). "
        "Hierarchical features are resized to the CAM resolution (official: stage 3's, the same on its "
        "stride-16 ResNet-50)."
    )

    def __init__(self, stages: Sequence[int] = SIDE_STAGES, background: str = "prototype") -> None:
        if len(stages) != len(SIDE_WIDTHS):
            raise ValueError(f"SIPE uses {len(SIDE_WIDTHS)} backbone stages; got {list(stages)}")
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}; got '{background}'")
        super().__init__(stages=list(stages), background=background)
        self.stages = tuple(int(i) for i in stages)
        self.background = background

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({"side": SideFeatures(stage_channels(model.backbone, self.stages))})

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return forward_with_stages(model, batch["image"], self.stages)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        cams = outputs["cams"]
        labels = batch["label"]
        valid = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)
        norm_cam = normalized_cam(cams) * valid[:, :, None, None]
        features = modules["side"](stage_list(outputs, len(self.stages)), (cams.shape[-2], cams.shape[-1]))
        seeds = structure_seeds(norm_cam.detach(), outputs["features"].detach(), valid)
        iscam = is_cam(image_prototypes(seeds, features), features)
        return {"gsc": gsc_loss(norm_cam, iscam)}

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return IsCamExtractor(model, modules["side"], self.stages, self.background, **kwargs)
