"""POT: prototypical optimal transport (Wang et al., CVPR 2025), a training-time method with frozen CLIP.

Why: one prototype per class (SIPE's) describes only the typical part of a class; POT clusters each
class's seed features of an image into several prototypes and activates the image with all of
them, so the less typical parts of an object (or a tissue) light up too. The released code ties the
result to CLIP-ES maps, which decide what is background.

Checked against jianwang91/POT (``POT/network/resnet50_POT.py``, ``POT/train_resnet50_POT.py``,
``POT/make_cam.py``, ``POT/make_seg_labels.py``):

* hierarchical features as SIPE's (four side 1x1 convolutions, 128/128/256/256 channels, each
  L2-normalised), but every side also reads the input image resized to its stage, and the stages
  are not detached;
* normalised CAM as SIPE's (``relu / (max + 1e-5)``, background ``1 - max`` first, times
  ``[1, labels]`` in training); **seeds**: each pixel's arg-max channel, seeds of absent classes dropped;
* **cluster prototypes**: per image and present class, k-means with cosine distance (``kmeans_pytorch``,
  ``num_clusters=2``) over the hierarchical features of its seeds (skipped below two seeds); the class's
  map is the mean over clusters of the cosine similarity of every pixel to the cluster centre, times
  the labels, over its maximum (+1e-5);
* **CLIP background** (``cam_class``): with CLIP-ES maps of the present classes and their background
  ``b = 1 - max``, each class map becomes ``relu(map - 0.5 b)`` and the background ``1 - max`` of those;
* **training target** (``cam_add``): the CLIP maps as ``relu(clip - 0.15 b)`` with their own background,
  times the labels; ``relu(1.2 x - 0.2 sum_c x)``; over the maximum; values below half their row's mean
  zeroed; where the arg-max of this and of ``cam_class`` agree, ``+ 0.2 cam_class``; capped at 1;
* **loss**: ``0.5 * multilabel soft margin + 10 * mean |cam_class / max - cam_add / max|`` (both times
  ``[1, labels]``);
* **pseudo-labels** (``make_cam.py``, ``make_seg_labels.py``): ``cam_class`` of every scale with its
  mirror fused at the feature level, summed, over its maximum; background ``+ 0.4``, classes ``x 2``;
  arg-max.

The released network also solves an entropic optimal transport (Sinkhorn, cost ``1 - cos``, uniform
marginals, epsilon 0.1) between pixels and cluster centres, but never uses the plan; neither the
training target nor the pseudo-labels depend on it, so it is not computed here. The background
channel's clusters are likewise computed and dropped there (``cam_class`` recomputes the background
from the classes), and skipped here.

Deviations (also :attr:`Pot.deviations`): the official loss weighs classification 0.5 against the
engine's 1, so the consistency weight is doubled here (20) to keep their ratio; the CLIP-ES maps
are computed on each training crop as it is trained (official: read from ``.npy`` files that
CLIP-ES wrote for the whole image resized to 512 x 512); k-means starts from a seeded random draw
(official: numpy's global state) and stops after 100 rounds at most (official: no limit); at
pseudo-labelling CLIP's background is subtracted once from the fused scales' maps (official: from
each scale's maps before they are summed); no IRN random walk after the arg-max (official: IRN on
the maps to the power 1.5); the classifier is the run's timm CNN (official: ResNet-50, stride 16)
and the engine's crops carry no padding (official: a valid mask zeroes padded borders). Options
``clusters`` and ``consistency_weight`` change the official 2 and 10 (x2). ``background="none"``, and
any label space without a thresholded background (tissue, land cover), skip CLIP at pseudo-labelling
and return the cluster-prototype maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.clims import classifier_label_space
from wsss_domains.methods.clip_methods import DEFAULT_CLIP_MODEL, ClipEs
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sipe import SIDE_STAGES, SIDE_WIDTHS, SideFeatures, normalized_cam, stage_list
from wsss_domains.models.stages import forward_with_stages, stage_channels

CLUSTERS = 2  # resnet50_POT.py: num_clusters
KMEANS_TOL = 1e-4  # kmeans_pytorch's default tol
KMEANS_MAX_ROUNDS = 100
CLASS_CLIP_BACKGROUND = 0.5  # cam_class: relu(map - 0.5 b)
TARGET_CLIP_BACKGROUND = 0.15  # cam_add: relu(clip - 0.15 b)
TARGET_SHARPEN = (1.2, 0.2)  # relu(1.2 x - 0.2 sum)
TARGET_ROW_MEAN = 0.5  # zero below half the row's mean
TARGET_MATCH = 0.2  # + 0.2 cam_class where the arg-maxes agree (training)
LABEL_BACKGROUND_OFFSET = 0.4  # make_cam.py: background + 0.4, classes x 2
BACKGROUNDS = ("clip", "none")


def argmax_seeds(norm_cam: Tensor, valid: Tensor) -> Tensor:
    """One-hot ``B x C x h x w`` of each pixel's arg-max channel, kept only where ``valid`` (``B x C``) is 1."""
    seeds = F.one_hot(norm_cam.argmax(dim=1), norm_cam.shape[1]).permute(0, 3, 1, 2).to(norm_cam.dtype)
    return seeds * valid[:, :, None, None]


def cosine_kmeans(points: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k x D`` centres of ``points`` (``N x D``, ``N >= k``) by k-means with cosine distance.

    As ``kmeans_pytorch``: the start is ``k`` distinct random points; each round assigns every point
    to its nearest centre by ``1 - cos`` and moves each centre to the (un-normalised) mean of its
    points (an empty cluster takes a random point); it stops when the squared sum of the centres'
    shifts falls below 1e-4. The returned centres are the means of the last assignment, so gradients
    reach ``points`` through them.
    """
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means of {n} points into {k} clusters")
    with torch.no_grad():
        x = points.detach().float()
        start = torch.randperm(n, generator=generator)[:k].to(x.device)
        centres = x[start].clone()
        unit = x / x.norm(dim=1, keepdim=True)
        for _ in range(KMEANS_MAX_ROUNDS):
            cos = unit @ (centres / centres.norm(dim=1, keepdim=True)).T
            assign = (1 - cos).argmin(dim=1)
            previous = centres.clone()
            for j in range(k):
                members = x[assign == j]
                if members.shape[0] == 0:
                    members = x[torch.randint(n, (1,), generator=generator).to(x.device)]
                centres[j] = members.mean(dim=0)
            if torch.sqrt(((centres - previous) ** 2).sum(dim=1)).sum() ** 2 < KMEANS_TOL:
                break
    return torch.stack(
        [points[assign == j].mean(dim=0) if bool((assign == j).any()) else centres[j] for j in range(k)]
    )


def cluster_maps(
    seeds: Tensor, features: Tensor, clusters: int = CLUSTERS, generator: torch.Generator | None = None
) -> Tensor:
    """``B x C x h x w``: per image and channel, the mean cosine similarity of every pixel's feature to
    the k-means centres of the channel's seed features (zero for a channel with too few seeds)."""
    b, c, h, w = seeds.shape
    if seeds.shape[-2:] != features.shape[-2:]:
        seeds = F.interpolate(seeds, size=features.shape[-2:], mode="nearest")
    flat = features.flatten(2).transpose(1, 2)  # B x hw x D
    out = []
    for i in range(b):
        rows = []
        for j in range(c):
            inside = seeds[i, j].flatten() > 0
            if int(inside.sum()) < clusters:
                rows.append(flat.new_zeros(flat.shape[1]))
                continue
            centres = cosine_kmeans(flat[i][inside], clusters, generator)
            sims = F.cosine_similarity(flat[i][None], centres[:, None, :], dim=2)  # clusters x hw
            rows.append(sims.mean(dim=0))
        out.append(torch.stack(rows))
    return torch.stack(out).view(b, c, *features.shape[-2:])


def max_normalized(maps: Tensor) -> Tensor:
    """Each channel over its spatial maximum (+1e-5), as ``F.adaptive_max_pool2d`` normalises there."""
    return maps / (maps.flatten(2).amax(dim=-1)[..., None, None] + 1e-5)


def with_background(foreground: Tensor) -> Tensor:
    """``B x (C+1)``: the background ``1 - max`` over the classes, then the classes."""
    return torch.cat([1 - foreground.amax(dim=1, keepdim=True), foreground], dim=1)


def clip_background_classes(
    class_maps: Tensor, clip: Tensor, weight: float = CLASS_CLIP_BACKGROUND
) -> Tensor:
    """``cam_class``: the classes' maps less ``weight`` x CLIP's background (``1 - max`` of ``clip``),
    rectified, with their own background first. ``class_maps`` and ``clip`` are ``B x C x h x w``."""
    clip_background = 1 - clip.amax(dim=1, keepdim=True)
    return with_background(F.relu(class_maps - weight * clip_background))


def training_target(cam_class: Tensor, clip: Tensor, valid: Tensor) -> Tensor:
    """``cam_add``: CLIP's maps sharpened, tied to ``cam_class`` where both pick the same channel.

    ``cam_class`` is ``B x (C+1) x h x w`` (background first), ``clip`` the ``B x C x h x w`` CLIP
    maps (zero for absent classes), ``valid`` ``B x (C+1)`` (``[1, labels]``).
    """
    clip_background = 1 - clip.amax(dim=1, keepdim=True)
    target = with_background(F.relu(clip - TARGET_CLIP_BACKGROUND * clip_background))
    target = target * valid[:, :, None, None]
    scale, shift = TARGET_SHARPEN
    target = max_normalized(F.relu(scale * target - shift * target.sum(dim=1, keepdim=True)))
    target = torch.where(target < TARGET_ROW_MEAN * target.mean(dim=3, keepdim=True), 0.0, target)
    agree = target.argmax(dim=1, keepdim=True) == cam_class.argmax(dim=1, keepdim=True)
    return torch.where(agree, target + TARGET_MATCH * cam_class, target).clamp(max=1.0)


def consistency_loss(cam_class: Tensor, cam_add: Tensor, valid: Tensor) -> Tensor:
    """``mean |cam_class / max - cam_add / max|`` of both maps times ``valid`` (``B x (C+1)``)."""
    v = valid[:, :, None, None]
    return (max_normalized(cam_class * v) - max_normalized(cam_add * v)).abs().mean()


def pseudo_label_maps(foreground: Tensor) -> Tensor:
    """Foreground ``K x H x W`` kept where POT's arg-max picks it: background ``1 - max`` (each map
    over its maximum) ``+ 0.4`` against the classes ``x 2``; zero elsewhere."""
    fused = max_normalized(with_background(foreground[None]))[0]
    scores = torch.cat([fused[:1] + LABEL_BACKGROUND_OFFSET, 2 * fused[1:]])
    winner = scores.argmax(dim=0)
    classes = torch.arange(1, scores.shape[0], device=scores.device)[:, None, None]
    return torch.where(winner[None] == classes, fused[1:], 0.0)


class PotExtractor(CamExtractor):
    """Multi-scale cluster-prototype maps (before CLIP); an image and its mirror fused at the feature level."""

    def __init__(
        self, model: nn.Module, side: SideFeatures, stages: Sequence[int], clusters: int, **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        self.side = side
        self.stages = tuple(stages)
        self.clusters = clusters

    def raw_maps(self, batch: Tensor) -> Tensor:
        outputs = forward_with_stages(self.model, batch, self.stages)
        cams = outputs["cams"]
        size = (cams.shape[-2], cams.shape[-1])
        features = self.side(stage_list(outputs, len(self.stages)), size, batch)
        fused = self.flip and batch.shape[0] == 2
        if fused:
            cams = (cams[0] + cams[1].flip(-1))[None]
            features = (features[0] + features[1].flip(-1))[None]
        norm_cam = normalized_cam(cams)
        # Every class's seeds: an absent class's pixels are no present class's seeds either way.
        seeds = argmax_seeds(norm_cam, torch.ones_like(norm_cam[:, :, 0, 0]))
        generator = torch.Generator().manual_seed(0)
        maps = max_normalized(cluster_maps(seeds[:, 1:], features, self.clusters, generator))
        return torch.cat([maps, maps.flip(-1)]) if fused else maps

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        return self.normalize(self.maps(image)).clamp_min(0.0)


@register_method
class Pot(ClipEs):
    name = "pot"
    description = (
        "POT (Wang et al., CVPR 2025): per-class k-means cluster prototypes of each image's seeds, "
        "tied to CLIP-ES maps by a consistency loss; CLIP decides background. Needs --clip-model and "
        "--clip-weights (use --bg-threshold 0 for POT's own arg-max)."
    )
    deviations = (
        "Consistency weight 20 against the engine's classification weight 1 (official 10 against 0.5). "
        "CLIP-ES maps computed on each training crop (official: precomputed for the whole image at "
        "512 x 512). k-means starts from a seeded draw and stops after 100 rounds. CLIP's background is "
        "subtracted once from the fused scales' maps (official: from each scale's before summing). No IRN "
        "after the arg-max. The released Sinkhorn plan, which nothing uses, is not computed. timm CNN "
        "instead of ResNet-50; no padded crops."
    )

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_weights: str | None = None,
        clusters: int = CLUSTERS,
        consistency_weight: float = 20.0,
        background: str = "clip",
        classes: Sequence[str] | None = None,
        stages: Sequence[int] = SIDE_STAGES,
    ) -> None:
        if clusters < 1:
            raise ValueError(f"pot: clusters must be at least 1, got {clusters}")
        if background not in BACKGROUNDS:
            raise ValueError(f"pot: background must be one of {BACKGROUNDS}; got '{background}'")
        if len(stages) != len(SIDE_WIDTHS):
            raise ValueError(f"pot uses {len(SIDE_WIDTHS)} backbone stages; got {list(stages)}")
        super().__init__(
            clip_model=clip_model,
            clip_weights=clip_weights,
            clusters=clusters,
            consistency_weight=consistency_weight,
            background=background,
            classes=None if classes is None else list(classes),
            stages=list(stages),
        )
        self.clusters = int(clusters)
        self.consistency_weight = float(consistency_weight)
        self.background = background
        self.classes = None if classes is None else tuple(classes)
        self.stages = tuple(int(i) for i in stages)
        self._extractor: PotExtractor | None = None

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        super().setup(domain, mean, std)
        self._text.clear()

    # -- training ----------------------------------------------------------------------------
    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        channels = stage_channels(model.backbone, self.stages)
        return nn.ModuleDict({"side": SideFeatures(channels, detach=False, with_image=True)})

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return forward_with_stages(model, batch["image"], self.stages)

    def clip_maps(self, images: Tensor, labels: Tensor) -> Tensor:
        """CLIP-ES maps ``B x C x H x W`` of each image's present classes (zero elsewhere) for a batch
        normalised with the classifier's statistics."""
        from wsss_domains.clip.clip_es import clip_es_cams

        if self.mean is None or self.std is None or self.domain is None:
            raise RuntimeError("pot: call setup(domain, mean, std) before training")
        num_classes = labels.shape[1]
        space = classifier_label_space(self.name, self.domain, self.classes, num_classes)
        loaded = self._clip(images.device)
        source = self.text_source(loaded, self.domain, space)
        prompts = self.domain.clip_prompts(space)
        mean = images.new_tensor(self.mean)[:, None, None]
        std = images.new_tensor(self.std)[:, None, None]
        out = images.new_zeros(images.shape[0], num_classes, *images.shape[-2:])
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            present = torch.nonzero(label > 0.5).flatten().tolist()
            if not present:
                continue
            names = [space.foreground_names[c] for c in present]
            pixels = (image.detach().float() * std + mean).clamp(0, 1)
            with torch.enable_grad():  # CLIP-ES differentiates CLIP's logits (GradCAM), never the classifier
                maps = clip_es_cams(loaded.model, loaded.tokenizer, pixels, names, prompts, text=source)
            out[i, present] = maps.to(out.device, out.dtype)
        return out

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        cams = outputs["cams"]
        labels = batch["label"]
        size = (cams.shape[-2], cams.shape[-1])
        valid = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)
        norm_cam = normalized_cam(cams) * valid[:, :, None, None]
        features = modules["side"](stage_list(outputs, len(self.stages)), size, batch["image"])
        seeds = argmax_seeds(norm_cam.detach(), valid)
        maps = max_normalized(cluster_maps(seeds[:, 1:], features, self.clusters) * labels[:, :, None, None])
        clip = self.clip_maps(batch["image"], labels)
        clip = F.interpolate(clip, size=size, mode="bilinear", align_corners=False) * labels[:, :, None, None]
        cam_class = clip_background_classes(maps, clip)
        cam_add = training_target(cam_class, clip, valid)
        loss = self.consistency_weight * consistency_loss(cam_class, cam_add, valid)
        # A batch without two seeds of any present class has no cluster: keep the side features in the
        # graph (zero gradient) so that every step, DDP's included, sees all trained parameters.
        return {"consistency": loss + 0.0 * features.sum()}

    # -- pseudo-labels -----------------------------------------------------------------------
    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        self._extractor = PotExtractor(model, modules["side"], self.stages, self.clusters, **kwargs)
        return self._extractor

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        """The extractor's cluster-prototype maps less CLIP's background, then POT's arg-max rule."""
        if self.background == "none" or context.bg_threshold is None:
            return cams  # no thresholded background: the cluster-prototype maps decide alone
        keep = context.present.bool()
        if not keep.any():
            return torch.zeros_like(cams)
        clip = super().refine(torch.zeros_like(cams), context)  # CLIP-ES maps of the present classes
        foreground = clip_background_classes(cams[None] * keep[None, :, None, None], clip[None])[0, 1:]
        return pseudo_label_maps(foreground)
