"""SEAM: self-supervised equivariant attention (Wang et al., CVPR 2020).

Why: a CAM should move with the image. SEAM runs the image and a rescaled copy (x0.3) and asks the
CAM of the copy to equal the rescaled CAM of the original (equivariant regularisation, ER). A pixel
correlation module (PCM) re-distributes each view's CAMs by the self-similarity of low-level
features and the image, and each view's PCM output is pulled towards the other view's CAM
(equivariant cross regularisation, ECR). Pseudo-labels use the PCM-refined maps.

Checked against YudeWang/SEAM (``train_SEAM.py``, ``network/resnet38_SEAM.py``, ``infer_SEAM.py``):

* ``max_norm`` (``tool/visualization.py``): ``relu(relu(p) - min - 1e-5) / (max - min + 1e-5)`` per map;
* ER: ``mean |max_norm(cam1)↓0.3 * y - max_norm(cam2) * y|`` over the foreground channels, where
  ``cam2`` is the CAM of the x0.3 image and ``y`` the image labels; both CAMs are first upsampled to
  their input size (bilinear, ``align_corners=True``), as the official network returns them;
* background channel, prepended (channel 0): ``1 - max`` of the label-masked foreground maps;
* ECR: mean of the top 20% (of all ``(K+1)·h·w`` entries per image) of
  ``|max_onehot(cam2) - max_norm(pcm1)↓0.3 * y|``, plus the same with the views swapped; ``max_onehot``
  zeroes each pixel's non-maximal foreground scores and the CAM side is detached;
* PCM input (no gradient): CAMs scaled by their maximum (``relu(c - 1e-5) / (max + 1e-5)``), background
  ``1 - max``, non-maximal foreground scores zeroed; PCM features: ``f9([image↓, relu(f8_3(s_a)),
  relu(f8_4(s_b))])`` from two detached backbone stages, affinity ``relu(f̂ᵀ f̂)`` normalised over its
  first axis (``f̂`` = features over their L2 norm + 1e-5);
* classification: the mean of both views' losses (so the engine's loss has weight 0.5), plus the
  mean of both views' ``adaptive_min_pooling_loss`` on the PCM maps (the lowest quarter of each
  image's max-over-classes PCM score pushed to 0); each view's scores are the global average of its
  CAMs *upsampled to the view's input size* (bilinear, ``align_corners=True``), as the official
  network returns them (:func:`forward_view`; the model's ``pooling`` is applied to the upsampled
  maps, GAP by default). This weights the feature map's border less than a plain GAP would;
* inference: the PCM maps' foreground channels, multi-scale and flipped, summed, then min-max
  normalised per class as ``infer_SEAM.py`` does (:func:`max_norm`: the sum rectified, shifted by
  its minimum, divided by its range; the official code's entries below the minimum + 1e-5 become
  negative there and 0 here, both under any background score). The shift matters: a PCM map is an
  affinity-weighted average and seldom falls to 0, so divided by its maximum alone it stays high
  everywhere and leaves no pixel to a background class (every COCO pseudo-label was foreground).

``tests/methods/test_seam_official.py`` compares all of the above with a transcription of the
official code. Deviations (also in :attr:`Seam.deviations`): at inference each scale's maps are
upsampled from feature resolution in one step (official: to the input with aligned corners inside
the network, then to the image); over a raster normalised across windows (``max_over="raster"``)
the maps are divided by the raster's maxima, without the minimum shift.

Adaptation to timm CNNs: the official ResNet-38 stages ``conv4``/``conv5`` (the two before the
classifier's) become the backbone's third- and second-last ``feature_info`` stages; they are
resized to the CAM resolution when their stride differs. Only foreground classes have a classifier
channel here; the official network's background channel of ``fc8`` receives no gradient (it is
overwritten before every loss), so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method
from wsss_domains.models.stages import forward_with_stages, stage_channels

SCALE_FACTOR = 0.3
ECR_TOP_RATIO = 0.2
PCM_STAGES = (-3, -2)


def max_norm(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """SEAM's per-map min-max normalisation of rectified ``B x C x h x w`` maps."""
    maps = F.relu(maps)
    flat = maps.flatten(2)
    high = flat.amax(dim=-1)[..., None, None]
    low = flat.amin(dim=-1)[..., None, None]
    return F.relu(maps - low - eps) / (high - low + eps)


def with_background(foreground: Tensor) -> Tensor:
    """Prepend the background channel ``1 - max`` of the foreground maps (``B x K x h x w``)."""
    return torch.cat([1 - foreground.amax(dim=1, keepdim=True), foreground], dim=1)


def max_onehot(maps: Tensor) -> Tensor:
    """Keep each pixel's maximal foreground score (channels 1..K), zero the others; background as is."""
    foreground = maps[:, 1:]
    top = foreground.amax(dim=1, keepdim=True)
    return torch.cat([maps[:, :1], foreground.masked_fill(foreground != top, 0)], dim=1)


def pcm_seeds(cams: Tensor) -> Tensor:
    """The maps the PCM propagates, from raw CAMs ``B x K x h x w``: ``B x (K+1) x h x w``, no gradient."""
    cams = F.relu(cams.detach())
    peak = cams.flatten(2).amax(dim=-1)[..., None, None] + 1e-5
    norm = F.relu(cams - 1e-5) / peak
    top = norm.amax(dim=1, keepdim=True)
    return torch.cat([1 - top, norm.masked_fill(norm < top, 0)], dim=1)


def pixel_correlation(seeds: Tensor, features: Tensor, eps: float = 1e-5) -> Tensor:
    """PCM propagation: ``seeds`` re-distributed by the rectified cosine self-similarity of ``features``.

    ``out[:, c, j] = sum_i seeds[:, c, i] * a_ij / (sum_i' a_i'j + eps)`` with
    ``a_ij = relu(<f_i, f_j>)`` and ``f`` the features over their L2 norm (+ eps).
    """
    b, _, h, w = features.shape
    if seeds.shape[-2:] != (h, w):
        seeds = F.interpolate(seeds, size=(h, w), mode="bilinear", align_corners=True)
    flat = features.flatten(2)
    flat = flat / (flat.norm(dim=1, keepdim=True) + eps)
    affinity = F.relu(flat.transpose(1, 2) @ flat)
    affinity = affinity / (affinity.sum(dim=1, keepdim=True) + eps)
    return (seeds.flatten(2) @ affinity).view(b, -1, h, w)


def forward_view(model: nn.Module, image: Tensor, stages: Sequence[int]) -> dict[str, Tensor]:
    """The model's outputs and ``stages`` for one SEAM view, ``logits`` pooled as the official code does.

    The official network returns its CAMs upsampled to the input (bilinear, aligned corners) and the
    training loop classifies by their global average, so ``logits`` is the model's pooling of the
    upsampled CAMs (for the default GAP: ``mean(upsample(cams))``, not ``mean(cams)``).
    """
    outputs = forward_with_stages(model, image, stages)
    up = F.interpolate(outputs["cams"], size=image.shape[-2:], mode="bilinear", align_corners=True)
    pool = getattr(model, "pool", None)
    logits = pool(up) if callable(pool) else up.mean(dim=(2, 3))
    return {**outputs, "logits": logits}


def adaptive_min_pooling_loss(maps: Tensor) -> Tensor:
    """Mean of the lowest quarter of each image's max-over-classes score, rectified."""
    n, _, h, w = maps.shape
    k = max(1, h * w // 4)
    lowest = torch.topk(maps.amax(dim=1).view(n, -1), k=k, dim=-1, largest=False)[0]
    return F.relu(lowest).sum() / (k * n)


def top_mean(values: Tensor, ratio: float) -> Tensor:
    """Mean of each image's largest ``ratio`` share of entries (SEAM's ECR reduction)."""
    flat = values.flatten(1)
    k = max(1, int(flat.shape[1] * ratio))
    return torch.topk(flat, k=k, dim=-1)[0].mean()


def equivariance_loss(cams: Tensor, cams_scaled: Tensor, labels: Tensor) -> Tensor:
    """ER: L1 between ``cams`` (resized to the other view) and the CAMs of the rescaled image.

    Both are raw ``B x K x h x w`` maps at their views' input sizes; ``labels`` is ``B x K``.
    """
    mask = labels[:, :, None, None]
    first = F.interpolate(max_norm(cams), size=cams_scaled.shape[-2:], mode="bilinear", align_corners=True)
    return (first * mask - max_norm(cams_scaled) * mask).abs().mean()


def equivariant_cross_loss(
    cams: Tensor, cams_scaled: Tensor, pcm: Tensor, pcm_scaled: Tensor, labels: Tensor, ratio: float
) -> Tensor:
    """ECR: each view's PCM maps against the other view's (detached) one-hot CAMs, top ``ratio`` mean.

    ``cams``/``cams_scaled`` are raw foreground CAMs, ``pcm``/``pcm_scaled`` the PCM outputs with the
    background first, all at their views' input sizes.
    """
    size = cams_scaled.shape[-2:]
    mask = labels[:, :, None, None]
    mask_bg = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)

    def down(maps: Tensor) -> Tensor:
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)

    first = with_background(down(max_norm(cams)) * mask)
    second = with_background(max_norm(cams_scaled) * mask)
    pcm_first = down(max_norm(pcm)) * mask_bg
    pcm_second = max_norm(pcm_scaled) * mask_bg
    return top_mean((max_onehot(second.detach()) - pcm_first).abs(), ratio) + top_mean(
        (max_onehot(first.detach()) - pcm_second).abs(), ratio
    )


class PixelCorrelationModule(nn.Module):
    """SEAM's PCM: embeds two detached backbone stages and the image, then propagates the CAMs."""

    def __init__(self, low_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.low = nn.Conv2d(low_channels, 64, kernel_size=1, bias=False)
        self.mid = nn.Conv2d(mid_channels, 128, kernel_size=1, bias=False)
        self.embed = nn.Conv2d(64 + 128 + 3, 192, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.low.weight)
        nn.init.kaiming_normal_(self.mid.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)

    def inputs(self, image: Tensor, low: Tensor, mid: Tensor, size: tuple[int, int]) -> Tensor:
        """``[image↓, relu(f8_3(conv4)), relu(f8_4(conv5))]`` at ``size`` (the CAM resolution), before ``f9``."""

        def at_size(x: Tensor) -> Tensor:
            return (
                x
                if x.shape[-2:] == size
                else F.interpolate(x, size=size, mode="bilinear", align_corners=True)
            )

        low = at_size(F.relu(self.low(low.detach())))
        mid = at_size(F.relu(self.mid(mid.detach())))
        return torch.cat([at_size(image), low, mid], dim=1)

    def features(self, image: Tensor, low: Tensor, mid: Tensor, size: tuple[int, int]) -> Tensor:
        """The PCM's per-pixel embedding at ``size`` (``f9`` of :meth:`inputs`)."""
        return self.embed(self.inputs(image, low, mid, size))

    def forward(self, cams: Tensor, image: Tensor, low: Tensor, mid: Tensor) -> Tensor:
        """PCM-refined maps ``B x (K+1) x h x w`` (background first) from raw CAMs ``B x K x h x w``."""
        size = (cams.shape[-2], cams.shape[-1])
        return pixel_correlation(pcm_seeds(cams), self.features(image, low, mid, size))


class PcmCamExtractor(CamExtractor):
    """Multi-scale CAMs from the PCM-refined maps (foreground channels), as SEAM's ``infer_SEAM.py``.

    ``subtract_minimum``: normalise the summed maps per class by their range after shifting them by
    their minimum (:func:`max_norm`, SEAM's and CPN's inference) instead of dividing by the maximum.
    """

    def __init__(
        self,
        model: nn.Module,
        pcm: nn.Module,
        stages: Sequence[int],
        subtract_minimum: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.pcm = pcm
        self.stages = tuple(stages)
        self.subtract_minimum = subtract_minimum

    def normalize(self, total: Tensor) -> Tensor:
        if self.normalization == "max" and self.subtract_minimum:
            return max_norm(total[None])[0]
        return super().normalize(total)

    def raw_maps(self, batch: Tensor) -> Tensor:
        outputs = forward_with_stages(self.model, batch, self.stages)
        return self.pcm(outputs["cams"], batch, outputs["stage0"], outputs["stage1"])[:, 1:]


@dataclass
class SeamViews:
    """Both views' forward passes: outputs of the classifier and PCM maps at feature resolution."""

    image: Tensor
    scaled_image: Tensor
    outputs: dict[str, Tensor]
    scaled_outputs: dict[str, Tensor]
    pcm: Tensor
    scaled_pcm: Tensor


@register_method
class Seam(Method):
    name = "seam"
    description = (
        "SEAM (Wang et al., CVPR 2020): equivariance between the CAMs of an image and its x0.3 copy, "
        "pixel correlation module; pseudo-labels from the PCM-refined CAMs."
    )
    deviations = (
        "Inference: the summed PCM maps are upsampled from feature resolution in one step (official: "
        "to the input with aligned corners, then to the image); over a raster normalised across windows "
        "they are divided by the raster's maxima without infer_SEAM.py's minimum shift. Backbone: a timm CNN's "
        "third- and second-last stages stand for ResNet-38's conv4/conv5, resized to the CAM "
        "resolution if their stride differs; no fc8 background channel (the official one is "
        "overwritten before every use, so no loss sees it)."
    )
    classification_weight = 0.5
    # infer_SEAM.py normalises the summed maps by their range after subtracting their minimum.
    subtract_minimum = True

    def __init__(
        self,
        scale_factor: float = SCALE_FACTOR,
        ecr_ratio: float = ECR_TOP_RATIO,
        pcm_stages: Sequence[int] = PCM_STAGES,
    ) -> None:
        if not 0 < scale_factor < 1 or not 0 < ecr_ratio <= 1 or len(pcm_stages) != 2:
            raise ValueError("need 0 < scale_factor < 1, 0 < ecr_ratio <= 1 and two pcm_stages")
        super().__init__(scale_factor=scale_factor, ecr_ratio=ecr_ratio, pcm_stages=list(pcm_stages))
        self.scale_factor = float(scale_factor)
        self.ecr_ratio = float(ecr_ratio)
        self.pcm_stages = tuple(int(i) for i in pcm_stages)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        low, mid = stage_channels(model.backbone, self.pcm_stages)
        return nn.ModuleDict({"pcm": PixelCorrelationModule(low, mid)})

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return forward_view(model, batch["image"], self.pcm_stages)

    def second_view(self, image: Tensor) -> Tensor:
        """The batch rescaled by ``scale_factor`` (bilinear, aligned corners), as ``train_SEAM.py``."""
        return F.interpolate(image, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)

    def views(
        self, model: nn.Module, modules: nn.ModuleDict, image: Tensor, outputs: dict[str, Tensor]
    ) -> SeamViews:
        """Run the second view (:meth:`second_view`) and both views' PCMs."""
        scaled_image = self.second_view(image)
        scaled_outputs = forward_view(model, scaled_image, self.pcm_stages)
        pcm = modules["pcm"]
        return SeamViews(
            image=image,
            scaled_image=scaled_image,
            outputs=outputs,
            scaled_outputs=scaled_outputs,
            pcm=pcm(outputs["cams"], image, outputs["stage0"], outputs["stage1"]),
            scaled_pcm=pcm(
                scaled_outputs["cams"], scaled_image, scaled_outputs["stage0"], scaled_outputs["stage1"]
            ),
        )

    def seam_losses(self, views: SeamViews, labels: Tensor) -> dict[str, Tensor]:
        """The SEAM terms besides the engine's (half-weighted) classification loss of the first view."""

        def up(maps: Tensor, like: Tensor) -> Tensor:
            return F.interpolate(maps, size=like.shape[-2:], mode="bilinear", align_corners=True)

        cams, scaled_cams = (
            up(views.outputs["cams"], views.image),
            up(views.scaled_outputs["cams"], views.scaled_image),
        )
        pcm, scaled_pcm = up(views.pcm, views.image), up(views.scaled_pcm, views.scaled_image)
        mask = labels[:, :, None, None]
        rvmin = adaptive_min_pooling_loss(pcm[:, 1:] * mask) + adaptive_min_pooling_loss(
            scaled_pcm[:, 1:] * mask
        )
        return {
            "cls_scaled": 0.5 * F.binary_cross_entropy_with_logits(views.scaled_outputs["logits"], labels),
            "rvmin": 0.5 * rvmin,
            "er": equivariance_loss(cams, scaled_cams, labels),
            "ecr": equivariant_cross_loss(cams, scaled_cams, pcm, scaled_pcm, labels, self.ecr_ratio),
        }

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        views = self.views(model, modules, batch["image"], outputs)
        return self.seam_losses(views, batch["label"])

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return PcmCamExtractor(
            model, modules["pcm"], self.pcm_stages, subtract_minimum=self.subtract_minimum, **kwargs
        )
