"""``seed-probe``: CAMs fused with a linear pixel classifier fitted on confident CAM pixels.

Why: where classes nearly always co-occur (tumour beside stroma), the classifier's last stage
learns to tell images apart, not pixels, and its CAMs separate the classes poorly. Shallow
stages (output strides 4 and 8) still describe local texture and colour (nuclei density, stain,
roofs and roads) and separate the classes better, but carry no class labels. The confident pixels
of the CAMs of the *training* split give them some: a linear classifier on those stages, fitted on those seeds across
all training images, learns what each class looks like at a fine grain and transfers to unseen
images (a dataset-level counterpart of cam-proto's image-specific prototypes; the same idea as
the second, segmentation stage of WSSS pipelines, kept linear so it cannot memorise CAM noise).

Fit (once per run and options, cached in the run folder under ``fitted/``):

1. for up to ``fit_images`` samples of the training split (as training saw them: patches with
   their image-level labels), the CAM pseudo-label over the present classes and its seeds: pixels
   of class ``c`` with CAM ``c`` in the top ``seed_fraction`` (0.3) of the image (see
   :func:`~wsss_domains.methods.cam_proto.confident_seeds`); in threshold-background domains,
   background pixels whose highest CAM is in the bottom ``seed_fraction`` are background seeds;
2. the features of the stages of output strides ``stride`` (4 and 8; the coarser one upsampled
   to the finer one's grid and concatenated), flip-averaged at the training magnification, at
   up to ``pixels_per_image`` seed cells per class and sample;
3. standardised features, a linear layer, class-balanced cross-entropy (Adam, ``steps`` full-batch
   steps; seeded, so a fit is reproducible).

Apply, per image: the probe's softmax over the present classes (and background where the domain
thresholds it), upsampled; ``cam' = norm((1 - w) * cam + w * prob)`` for present classes the probe
saw seeds of (``fuse_weight`` ``w`` = 0.5); the labels are then assembled as for plain CAM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.domains.contract import BackgroundMode, DomainPlugin, LabelSpace
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.cam_proto import confident_seeds, label_channels
from wsss_domains.methods.fitting import FitContext
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_proto import fuse_prototype_cams
from wsss_domains.methods.stage_probe import STEPS, PixelProbe, StageProbe, new_probe, parse_strides
from wsss_domains.pseudo_labels.assemble import cams_to_labels

__all__ = ["PixelProbe", "SeedProbe", "fit_probe", "parse_strides"]

SEED_FRACTION = 0.3
PIXELS_PER_IMAGE = 256


def fit_probe(
    features: Tensor, targets: Tensor, num_outputs: int, steps: int = STEPS, seed: int = 0
) -> PixelProbe:
    """A :class:`PixelProbe` fitted to ``N x D`` features and ``N`` targets in ``[0, num_outputs)``.

    Full-batch Adam on class-balanced cross-entropy: rare classes (tumour seeds are few beside
    stroma) weigh as much as common ones.
    """
    if features.ndim != 2 or targets.shape != features.shape[:1]:
        raise ValueError(
            f"expected N x D features and N targets, got {tuple(features.shape)}, {tuple(targets.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("no seed pixels to fit the probe on")
    probe, optimiser = new_probe(features, num_outputs, torch.Generator().manual_seed(seed))
    counts = torch.bincount(targets, minlength=num_outputs).float()
    weight = torch.where(
        counts > 0, counts.sum() / (num_outputs * counts.clamp_min(1)), torch.zeros_like(counts)
    )
    x = features[:, :, None, None]
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(x)[:, :, 0, 0], targets, weight=weight)
        loss.backward()
        optimiser.step()
    return probe.eval()


@register_method
class SeedProbe(StageProbe):
    name = "seed-probe"
    description = (
        "CAM fused with a linear pixel classifier on the stride-4 and stride-8 backbone stages, fitted on the"
        " confident CAM pixels of the run's training split (post hoc; options stride, seed_fraction, fuse_weight,"
        " fit_images, pixels_per_image, steps)."
    )

    def __init__(
        self,
        seed_fraction: float = SEED_FRACTION,
        pixels_per_image: int = PIXELS_PER_IMAGE,
        **probe_options: Any,
    ) -> None:
        super().__init__(seed_fraction=seed_fraction, pixels_per_image=pixels_per_image, **probe_options)
        self.seed_fraction = float(seed_fraction)
        self.pixels_per_image = int(pixels_per_image)
        if not 0.0 < self.seed_fraction <= 1.0:
            raise ValueError(f"seed-probe: seed_fraction must lie in (0, 1], got {self.seed_fraction}")
        if min(self.fit_images, self.pixels_per_image, self.steps) < 1:
            raise ValueError("seed-probe: fit_images, pixels_per_image and steps must be at least 1")

    def seed_targets(
        self,
        cams: Tensor,
        present: Tensor,
        domain: DomainPlugin,
        label_space: LabelSpace,
        exclude: Tensor | None,
    ) -> Tensor:
        """``C x H x W`` boolean seeds of one training image (background last, where thresholded)."""
        threshold = None
        if label_space.background_mode is BackgroundMode.THRESHOLD:
            threshold = domain.background_threshold(label_space)
        pseudo = cams_to_labels(cams, present, label_space, threshold, exclude)
        channels = label_channels(pseudo, label_space)
        scored = pseudo != label_space.ignore_index
        keep = present.bool().to(cams.device)
        seeds = confident_seeds(cams, channels, scored, self.seed_fraction) & keep[:, None, None]
        if threshold is None:
            return seeds
        background = (pseudo == label_space.background_index) & scored
        low = torch.zeros_like(background)
        if background.any():
            peak = cams[keep].amax(0) if keep.any() else torch.zeros_like(cams[0])
            cut = torch.quantile(peak[scored].float(), self.seed_fraction).to(peak.dtype)
            low = background & (peak <= cut)
            low = low if low.any() else background
        return torch.cat([seeds, low[None]])

    def fit(self, context: FitContext) -> None:
        fitted_with = {
            "stride": list(self.strides),
            "seed_fraction": self.seed_fraction,
            "fit_images": self.fit_images,
            "pixels_per_image": self.pixels_per_image,
            "steps": self.steps,
        }
        path = context.cache_path(self.name, fitted_with)
        outputs = self._outputs(context.label_space)
        if self._load(path, outputs):
            return
        features, targets = self.collect_seeds(context)
        self.probe = fit_probe(features, targets, outputs, self.steps)
        self.seen = torch.bincount(targets, minlength=outputs) > 0
        self._save(path)

    @torch.no_grad()
    def collect_seeds(self, context: FitContext) -> tuple[Tensor, Tensor]:
        """``N x D`` stage features and ``N`` output indices of seed cells across the training split."""
        generator = torch.Generator().manual_seed(0)
        label_space, domain = context.label_space, context.domain
        features: list[Tensor] = []
        targets: list[Tensor] = []
        for item in self.fit_samples(
            context, context.dataset, generator, lambda present: bool(present.any())
        ):
            present, exclude = item.present, item.exclude
            feats = self._normalized_features(item.x)[0]
            cams = context.extractor(item.x.to(feats.device))
            seeds = self.seed_targets(cams, present.to(cams.device), domain, label_space, exclude)
            cells = F.interpolate(seeds[None].float(), size=feats.shape[-2:], mode="area")[0] > 0.5
            cells &= cells.sum(0, keepdim=True) == 1  # a cell two classes claim teaches nothing
            flat = feats.flatten(1).T
            for output in range(cells.shape[0]):
                where = cells[output].flatten().nonzero()[:, 0]
                if where.numel() > self.pixels_per_image:
                    pick = torch.randperm(where.numel(), generator=generator)[: self.pixels_per_image]
                    where = where[pick.to(where.device)]
                features.append(flat[where].cpu())
                targets.append(torch.full((where.numel(),), output, dtype=torch.int64))
        if not features or sum(t.numel() for t in targets) == 0:
            raise ValueError("seed-probe: the training split gave no seed pixels (no labelled images?)")
        return torch.cat(features), torch.cat(targets)

    @torch.no_grad()
    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        keep = context.present.bool().to(cams.device)
        if not keep.any() or self.fuse_weight == 0.0:
            if self.probe is None:
                raise RuntimeError("seed-probe: fit() must run before refine (the engine calls it)")
            return cams
        probs, valid = self.probabilities(keep, context)
        if not valid.any():
            return cams
        return fuse_prototype_cams(cams, probs.to(cams.device), valid, self.fuse_weight)
