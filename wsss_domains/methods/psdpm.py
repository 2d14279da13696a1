"""PSDPM: prototype-based secondary discriminative pixels mining (Zhao et al., CVPR 2024).

Why: prototype CAMs (SIPE-style) still light up the pixels the classification loss found most
discriminative. PSDPM re-weights every stage's features by a learned pixel-to-pixel attention (the
foreground pixel estimation module, FPEM), classifies the attended features with the same heads, and
pulls the resulting CAMs towards the segmentation of a *baseline* WSSS pipeline, which has already
reached the secondary discriminative pixels; a prototype CAM built from the attended features is held
to the same maps. A class memory (one recent image per class) joins every batch so that rare classes
keep contributing.

Checked against xinqiaozhao/PSDPM (``network/resnet50_psdpm.py``, ``train_resnet50_psdpm.py``,
``make_cam.py``):

* three bias-free 1x1 classifiers, on the final features (the classifier's own head), on the
  stride-16 stage (``classifier2``) and on the stride-8 stage (``classifier3``); each CAM is
  normalised as SIPE's (``relu / (max + 1e-5)``, background ``1 - max`` first), resized to the final
  features' grid (bilinear, aligned corners) and multiplied by the valid mask ``[1, labels]``; the
  multi-stage CAM is ``(CAM_4 + 0.5 CAM_3 + 0.25 CAM_2) / 1.75`` (:func:`stage_weighted`);
* FPEM per stage (``Net.PCM``/``PCM2``/``PCM3``): ``e = relu(f_b(relu(f_a([rgb, x]))))`` with
  ``f_a``: C+3 -> C and ``f_b``: C -> C (1x1, bias-free; ``rgb`` the normalised image resized to the
  stage, aligned corners), attention ``A = softmax_j(e_i . e_j)`` (no scaling, no normalisation), and
  the attended features ``A x + 5 x`` (:class:`ForegroundEstimation`); the same three heads classify
  them, normalised and weighted as above into the FPEM CAM;
* logits: the sum of the six heads' global averages (three on the stages, three on the attended
  stages), multi-label soft margin loss;
* prototype CAM (``Net.prototype``): hierarchical features from three bias-free side convolutions
  (stride-8 stage -> 128, stride-16 -> 256, final -> 256), each L2-normalised (+1e-5), resized
  (bilinear) and concatenated, once on the attended stages and once on the plain ones; the prototypes
  are the spatial mean of the attended hierarchical features weighted by the FPEM CAM (soft, not
  seeds), the prototype CAM is ``relu(cos)`` of the plain hierarchical features with them, times the
  valid mask (:func:`prototype_cam`);
* losses (``train_resnet50_psdpm.py``), for the image at scale 1 and at scale 0.5 (the baseline maps
  resized): ``L = (cls_1 + cls_0.5) / 2 + 2 mean(|B - F| + 0.05 |P - F|)_1 + 0.4 mean(...)_0.5`` with
  ``B`` the baseline's maps times the valid mask, ``F`` the FPEM CAM and ``P`` the prototype CAM
  (:func:`psdpm_consistency`);
* class memory (the official ``slot``): after each step, every image is stored under a class drawn
  uniformly among the background and its present classes, with its labels and baseline maps; the stored
  images join the next batches (both scales), in the same forward pass;
* inference (``make_cam.py``, class ``CAM``): the multi-stage CAM of the three heads on the plain
  stages, summed over scales and divided by its maximum.

At pseudo-label time the foreground maps meet the run's background threshold like every method's
(official: its background channel is kept, and ``IS_CAM + pad(IS_CAM[1:], 0.4)`` gives background
``bg + 0.4`` against foreground ``2 fg``, so a class wins roughly where its score exceeds 0.47).

Deviations (also in :attr:`Psdpm.deviations`): the baseline's segmentation results come from a
frozen earlier training run (``baseline_run``, any method): its classifier's CAMs on the same crop,
normalised as above (official: the multi-scale output of a DeepLab trained on a baseline's
pseudo-labels, saved per image); without ``baseline_run`` the model's own multi-stage CAM, detached,
stands in (so the method also runs in one training run, e.g. in ``bench``). Empty memory slots are not
fed (official: K+1 black images labelled with every class until filled). No gradient clipping (official:
norm 1). Hierarchical features are resized to the final features' grid (official: the stride-16
stage's, the same on its ResNet-50). Inference averages flips (official: computes the mirror, uses
only the image). Backbone: the timm CNN's final features, its second-last and third-last
``feature_info`` stages stand for ResNet-50's ``layer4``, ``layer3`` and ``layer2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.errors import UserError
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sipe import normalized_cam
from wsss_domains.models.stages import forward_with_stages, stage_channels

STAGES = (-3, -2)  # ResNet-50's layer2 (stride 8) and layer3 (stride 16)
STAGE_WEIGHTS = (1.0, 0.5, 0.25)  # final features, stride 16, stride 8
SIDE_WIDTHS = (128, 256, 256)  # stride 8, stride 16, final
RESIDUAL = 5.0
GSC_WEIGHT = 2.0
HALF_WEIGHT = 0.4
PROTOTYPE_WEIGHT = 0.05


def head_cam(raw: Tensor, size: tuple[int, int], valid: Tensor) -> Tensor:
    """One head's CAM as PSDPM uses it: normalised with background, resized (aligned corners), masked."""
    return F.interpolate(normalized_cam(raw), size=size, mode="bilinear", align_corners=True) * valid


def stage_weighted(maps: Sequence[Tensor], weights: Sequence[float] = STAGE_WEIGHTS) -> Tensor:
    """``(w_4 M_4 + w_3 M_3 + w_2 M_2) / sum(w)``: final, stride-16 and stride-8 maps, in that order."""
    total = sum(w * m for w, m in zip(weights, maps, strict=True))
    return total / sum(weights)


class ForegroundEstimation(nn.Module):
    """FPEM on one stage: learned pixel-to-pixel attention, attended features plus ``5 x`` the stage."""

    def __init__(self, channels: int, residual: float = RESIDUAL) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels + 3, channels, kernel_size=1, bias=False)
        self.embed2 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.residual = residual

    def forward(self, image: Tensor, features: Tensor) -> Tensor:
        n, c, h, w = features.shape
        rgb = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)
        e = F.relu(self.embed2(F.relu(self.embed(torch.cat([rgb, features], dim=1))))).flatten(2)
        attention = F.softmax(e.transpose(1, 2) @ e, dim=-1)  # B x hw x hw, rows sum to 1
        attended = attention @ features.flatten(2).transpose(1, 2)  # B x hw x C
        return attended.transpose(1, 2).reshape(n, c, h, w) + self.residual * features


class HierarchicalFeatures(nn.Module):
    """Side convolutions of the stride-8, stride-16 and final maps, L2-normalised, resized, stacked."""

    def __init__(self, channels: Sequence[int], widths: Sequence[int] = SIDE_WIDTHS) -> None:
        super().__init__()
        self.sides = nn.ModuleList(
            nn.Conv2d(c, w, kernel_size=1, bias=False) for c, w in zip(channels, widths, strict=True)
        )

    def forward(self, maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        parts = []
        for side, x in zip(self.sides, maps, strict=True):
            x = side(x)
            x = x / (torch.norm(x, dim=1, keepdim=True) + 1e-5)
            parts.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return torch.cat(parts, dim=1)


def prototype_cam(weights: Tensor, attended: Tensor, plain: Tensor) -> Tensor:
    """``Net.prototype``: per class, the ``weights``-weighted spatial mean of ``attended`` as prototype;
    ``relu(cos)`` of each ``plain`` pixel with it. ``B x C x h x w``."""
    h, w = attended.shape[-2:]
    if weights.shape[-2:] != (h, w):
        weights = F.interpolate(weights, size=(h, w), mode="nearest")
    prototypes = torch.einsum("bchw,bdhw->bcd", weights, attended) / (h * w)
    return F.relu(torch.cosine_similarity(plain[:, None], prototypes[..., None, None], dim=2))


def psdpm_consistency(
    baseline: Tensor, fpem: Tensor, prototype: Tensor, weight: float = PROTOTYPE_WEIGHT
) -> Tensor:
    """``mean(|B - F| + w |P - F|)``: FPEM CAM towards the baseline's maps and the prototype CAM."""
    return ((baseline - fpem).abs() + weight * (prototype - fpem).abs()).mean()


class PsdpmModules(nn.Module):
    """The two extra heads, the three FPEMs and the side convolutions."""

    def __init__(self, channels: Sequence[int], num_classes: int, residual: float = RESIDUAL) -> None:
        super().__init__()
        c2, c3, c4 = channels
        self.classifier2 = nn.Conv2d(c3, num_classes, kernel_size=1, bias=False)
        self.classifier3 = nn.Conv2d(c2, num_classes, kernel_size=1, bias=False)
        self.fpem = nn.ModuleList(ForegroundEstimation(c, residual) for c in (c4, c3, c2))
        self.side = HierarchicalFeatures((c2, c3, c4))


def psdpm_maps(
    modules: PsdpmModules, head: nn.Module, image: Tensor, stages: Sequence[Tensor], valid: Tensor
) -> dict[str, Tensor]:
    """``Net.forward`` after the backbone: logits (six heads), multi-stage, FPEM and prototype CAMs.

    ``stages``: the stride-8, stride-16 and final maps; ``valid``: ``B x (K+1)``, 1 for the background
    and the present classes. Every map is on the final features' grid.
    """
    x2, x3, x4 = stages
    size = (x4.shape[-2], x4.shape[-1])
    mask = valid[:, :, None, None]
    heads = (head, modules.classifier2, modules.classifier3)
    raw = [h(x) for h, x in zip(heads, (x4, x3, x2), strict=True)]
    attended = [fpem(image, x) for fpem, x in zip(modules.fpem, (x4, x3, x2), strict=True)]
    raw_attended = [h(a) for h, a in zip(heads, attended, strict=True)]
    logits = sum(r.mean(dim=(2, 3)) for r in raw + raw_attended)
    cam = stage_weighted([head_cam(r, size, mask) for r in raw])
    fpem_cam = stage_weighted([head_cam(r, size, mask) for r in raw_attended])
    hierarchical = modules.side(attended[::-1], size)
    plain = modules.side([x2, x3, x4], size)
    proto = prototype_cam(fpem_cam, hierarchical, plain) * mask
    return {"logits": logits, "cam": cam, "fpem_cam": fpem_cam, "prototype_cam": proto}


def psdpm_view(
    model: nn.Module, modules: PsdpmModules, image: Tensor, valid: Tensor, stages: Sequence[int]
) -> dict[str, Tensor]:
    """One scale through the classifier's backbone and :func:`psdpm_maps`."""
    outputs = forward_with_stages(model, image, stages)
    maps = [outputs["stage0"], outputs["stage1"], outputs["features"]]
    return {**outputs, **psdpm_maps(modules, model.head, image, maps, valid)}


class PsdpmCamExtractor(CamExtractor):
    """``make_cam.py``: the multi-stage CAM of the three heads (foreground channels), per scale."""

    def __init__(self, model: nn.Module, modules: PsdpmModules, stages: Sequence[int], **kwargs: Any) -> None:
        if kwargs.get("normalization", "max") != "max":
            raise UserError(
                "psdpm: its heads' CAMs are max-normalised (make_cam.py); --cam-norm sigmoid does not apply"
            )
        super().__init__(model, **kwargs)
        self.modules = modules
        self.stages = tuple(stages)

    def raw_maps(self, batch: Tensor) -> Tensor:
        outputs = forward_with_stages(self.model, batch, self.stages)
        size = (outputs["cams"].shape[-2], outputs["cams"].shape[-1])
        raw = [
            outputs["cams"],
            self.modules.classifier2(outputs["stage1"]),
            self.modules.classifier3(outputs["stage0"]),
        ]
        ones = torch.ones(1, device=batch.device)
        return stage_weighted([head_cam(r, size, ones) for r in raw])[:, 1:]


class Baseline:
    """A frozen earlier run whose classifier's CAMs stand for the baseline's segmentation results."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from wsss_domains.training.run import load_run

        try:
            self.config, self.model, _ = load_run(path, device)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"psdpm: baseline_run {path}: {exc}") from exc
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def check_classes(self, num_classes: int) -> None:
        if self.model.num_classes != num_classes:
            raise UserError(
                f"psdpm: baseline_run has {self.model.num_classes} classes, this run {num_classes}; "
                "the baseline must be trained on the same label space"
            )

    @torch.no_grad()
    def maps(
        self, image: Tensor, mean: Sequence[float], std: Sequence[float], size: tuple[int, int]
    ) -> Tensor:
        """``B x (K+1) x h x w`` normalised CAMs (background first) of a batch normalised with ``mean``/``std``."""
        from wsss_domains.training.data import denormalize, normalize

        pixels = denormalize(image, tuple(mean), tuple(std))
        cams = self.model.eval().cams(normalize(pixels, self.config.mean, self.config.std), rectify=False)
        return F.interpolate(normalized_cam(cams), size=size, mode="bilinear", align_corners=False)


@register_method
class Psdpm(Method):
    name = "psdpm"
    description = (
        "PSDPM (Zhao et al., CVPR 2024): attention-refined stage features (FPEM) classified by three "
        "heads, their CAMs pulled towards a baseline's maps (baseline_run) and a prototype CAM; a class "
        "memory joins every batch. Pseudo-labels from the three heads' multi-stage CAM."
    )
    deviations = (
        "Baseline maps: a frozen earlier run's classifier CAMs on the same crop (baseline_run; official: "
        "a DeepLab trained on a baseline's pseudo-labels, its multi-scale output saved per image); without "
        "baseline_run, the model's own multi-stage CAM, detached. Empty memory slots are not fed (official: "
        "black images labelled with every class). No gradient clipping (official: norm 1). Hierarchical "
        "features on the final features' grid (official: stride-16 stage's, the same on ResNet-50). "
        "Inference averages flips (official: mirror computed, unused); its background channel is dropped "
        "for the run's background threshold (official: bg + 0.4 against 2 fg). Backbone: a timm CNN's final "
        "features and its second- and third-last stages stand for ResNet-50's layer4/3/2."
    )
    classification_weight = 0.0  # the official loss classifies the batch and the memory together

    def __init__(
        self,
        baseline_run: str | None = None,
        stages: Sequence[int] = STAGES,
        gsc_weight: float = GSC_WEIGHT,
        half_weight: float = HALF_WEIGHT,
        prototype_weight: float = PROTOTYPE_WEIGHT,
        class_memory: bool = True,
    ) -> None:
        if len(stages) != 2:
            raise ValueError(
                f"psdpm: stages are the stride-8 and stride-16 stages (two indices); got {list(stages)}"
            )
        if min(gsc_weight, half_weight, prototype_weight) < 0:
            raise ValueError("psdpm: loss weights must be >= 0")
        super().__init__(
            baseline_run=baseline_run,
            stages=list(stages),
            gsc_weight=gsc_weight,
            half_weight=half_weight,
            prototype_weight=prototype_weight,
            class_memory=class_memory,
        )
        self.baseline_run = None if baseline_run is None else Path(baseline_run)
        self.stages = tuple(int(i) for i in stages)
        self.gsc_weight = float(gsc_weight)
        self.half_weight = float(half_weight)
        self.prototype_weight = float(prototype_weight)
        self.class_memory = bool(class_memory)
        self._baseline: Baseline | None = None
        self.memory: dict[int, dict[str, Tensor]] = {}

    def setup(self, domain: Any, mean: Any, std: Any) -> None:
        """Also checks the baseline run's folder, so a wrong path fails before training."""
        super().setup(domain, mean, std)
        if self.baseline_run is not None and not (self.baseline_run / "run.json").is_file():
            raise UserError(
                f"psdpm: baseline_run {self.baseline_run} is not a training run folder (no run.json); "
                "train the baseline first (wsss-domains train --out DIR) and pass --method-option baseline_run=DIR"
            )

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        c2, c3 = stage_channels(model.backbone, self.stages)
        return nn.ModuleDict(
            {"psdpm": PsdpmModules((c2, c3, model.backbone.num_features), model.num_classes)}
        )

    def _memory_batch(self, image: Tensor) -> dict[str, Tensor] | None:
        items = [m for m in self.memory.values() if m["image"].shape == image.shape[1:]]
        if not self.class_memory or not items:
            return None
        return {key: torch.stack([m[key] for m in items]) for key in items[0]}

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The batch and, in training, the class memory's images in one pass (as the official loop)."""
        image, labels = batch["image"], batch["label"]
        valid = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)
        memory = self._memory_batch(image) if model.training else None
        if memory is not None:
            image = torch.cat([image, memory["image"].to(image)])
            valid = torch.cat([valid, memory["valid"].to(valid)])
        out = psdpm_view(model, modules["psdpm"], image, valid, self.stages)
        n = labels.shape[0]
        return {**out, "all_logits": out["logits"], "logits": out["logits"][:n], "all_image": image,
                "valid": valid, "memory": memory}  # fmt: skip

    def _baseline_maps(self, outputs: dict[str, Tensor], size: tuple[int, int], n: int) -> Tensor:
        if self.baseline_run is None:
            return outputs["cam"][:n].detach()
        if self._baseline is None:
            self._baseline = Baseline(self.baseline_run, outputs["cam"].device)
            self._baseline.check_classes(outputs["cam"].shape[1] - 1)
        assert self.mean is not None and self.std is not None
        return self._baseline.maps(outputs["all_image"][:n], self.mean, self.std, size)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        labels = batch["label"]
        n = labels.shape[0]
        image, valid, memory = outputs["all_image"], outputs["valid"], outputs["memory"]
        size = (outputs["cam"].shape[-2], outputs["cam"].shape[-1])
        baseline = self._baseline_maps(outputs, size, n)
        targets = valid[:, 1:]
        if memory is not None:
            baseline = torch.cat([baseline, F.interpolate(memory["baseline"].to(baseline), size=size,
                                                          mode="bilinear", align_corners=False)])  # fmt: skip
        half = F.interpolate(image, scale_factor=0.5, mode="bilinear", align_corners=True)
        half_out = psdpm_view(model, modules["psdpm"], half, valid, self.stages)
        half_size = (half_out["cam"].shape[-2], half_out["cam"].shape[-1])
        half_baseline = F.interpolate(baseline, size=half_size, mode="bilinear", align_corners=False)
        mask = valid[:, :, None, None]
        cls = (
            F.multilabel_soft_margin_loss(outputs["all_logits"], targets)
            + F.multilabel_soft_margin_loss(half_out["logits"], targets)
        ) / 2
        gsc = self.gsc_weight * psdpm_consistency(
            baseline * mask, outputs["fpem_cam"], outputs["prototype_cam"], self.prototype_weight
        )
        half_gsc = self.half_weight * psdpm_consistency(
            half_baseline * mask, half_out["fpem_cam"], half_out["prototype_cam"], self.prototype_weight
        )
        if self.class_memory:
            self.remember(image[:n].detach(), valid[:n].detach(), baseline[:n].detach())
        return {"cls": cls, "gsc": gsc, "gsc_half": half_gsc}

    def remember(self, images: Tensor, valid: Tensor, baseline: Tensor) -> None:
        """The official slots: each image under a class drawn among the background and its present classes."""
        for i in range(images.shape[0]):
            candidates = torch.nonzero(valid[i] > 0).flatten()
            slot = int(candidates[torch.randint(0, len(candidates), ())].item())
            self.memory[slot] = {"image": images[i], "valid": valid[i], "baseline": baseline[i]}

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return PsdpmCamExtractor(model, modules["psdpm"], self.stages, **kwargs)
