"""RCA: regional semantic contrast and aggregation (Zhou et al., CVPR 2022).

Why: a CAM classifier only ever compares the regions of one batch. RCA keeps a memory bank of
class-region embeddings from the whole dataset and uses it twice: a contrastive loss pulls each
image's class-region embedding towards the bank's entries of that class and away from the others
(with a mix-up of two regions), and a semantic aggregation module attends from every pixel to the
bank's per-class cluster centres, so the refined classifier sees dataset-level context.

Checked against maeve07/RCA (``models/rca.py``, ``train.py``); the official defaults are this
module's:

* memory: per class a queue of 500 embeddings (random normal at the start); an image's region of a
  present class whose refined probability exceeds 0.7 is the pixels where the coarse CAM's softmax
  over classes beats its own mean, its embedding the region's mean backbone feature; it updates the
  queue slot at the class's pointer with momentum 0.99 and moves the pointer on;
* clusters: per class, k-means (10 centres) of its queue, recomputed periodically;
* aggregation: ``q = Q(x)`` (1x1 conv), ``k = K(c)``, ``v = V(c)`` (linear) over the centres ``c`` of
  every class, ``x' = P([x, A((q k^T) * 20 / 10) v])`` (no softmax, as official), the refined CAMs a
  classifier over ``x'``;
* losses: ``MLSM(refined) + 0.4 MLSM(coarse) + 0.01 L_contrast``, the contrast only after the first
  2 of 30 epochs; per image and present class ``c``, the region embedding of ``extra_F(x)`` is mixed
  with that of a random present class ``c'`` of a random image of the batch, ``lam ~ Beta(8, 8)``, and
  ``L = lam * l(c) + (1 - lam) * l(c')`` with ``l(y) = mean_p -log(e^{s_p} / (e^{s_p} + sum_n e^{s_n}))``
  over the bank entries ``p`` of class ``y`` and ``n`` of the other classes, ``s`` the cosine over
  temperature 0.07; averaged over the image's classes, summed over the batch;
* pseudo-labels from the refined branch's CAMs.

Deviations (also in :attr:`Rca.deviations`):

* the refined classifier is one bias-free 1x1 convolution (official: per class three 512-channel 3x3
  convolutions and a 1x1); ``extra_F`` is 1x1 convolutions at the backbone's width (official: 3x3 at
  512 channels), as EfficientNet's 1280 channels would make 3x3 ones outweigh the backbone;
* the clusters are recomputed every ``cluster_every`` optimiser steps (official: at every epoch's
  start), with a seeded torch k-means (k-means++ start, Lloyd iterations) instead of scikit-learn's;
* an image's regions are each cut from its unmasked features (official: the feature map is masked in
  place, so an image's second class is cut from its first class's region);
* pseudo-labels come from the refined CAMs at the end of training, read like every method's (the
  run's background threshold); official: OAA's online accumulation of the attention maps across
  epochs, min-max normalised, background from a saliency map (``gen_labels.py``: ``1 - sal / 255``),
  a dense CRF, and pixels claimed by two classes or salient background ignored; no saliency maps
  exist for these domains;
* the warm-up is a share of the training budget (2/30), not two epochs.

With momentum 0.99 each bank slot moves 1% per visit: on a budget of a few hundred steps the bank is
still mostly its random start (``momentum=0`` stores embeddings as they come).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method

AGGREGATION_SCALE = 20.0  # rca.py: ``sim = q k^T / cluter_num * 20``


def region_mask(coarse_cams: Tensor, cls: int) -> Tensor:
    """``h x w`` booleans: where the softmax over classes of ``coarse_cams`` (``K x h x w``) for
    ``cls`` exceeds its own spatial mean."""
    soft = coarse_cams.softmax(dim=0)[cls]
    return soft > soft.mean()


def region_embedding(features: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``features`` (``D x h x w``) over ``mask`` (an empty mask gives zeros)."""
    weights = mask.to(features.dtype)
    return (features * weights).flatten(1).sum(dim=1) / weights.sum().clamp_min(1.0)


def bank_logits(anchors: Tensor, memory: Tensor, temperature: float) -> Tensor:
    """``R x K x L``: the cosines of ``anchors`` (``R x D``) with every entry of the bank ``memory``
    (``K x L x D``) over ``temperature``, less each row's maximum (detached, for a stable exp).

    The bank is normalised once for all anchors, so autograd keeps one copy of it per step rather
    than one per region (on COCO's 80 classes a copy is 80 x 500 x 1280 floats)."""
    classes, length, _ = memory.shape
    logits = F.normalize(anchors, dim=1) @ F.normalize(memory.flatten(0, 1), dim=1).T / temperature
    logits = logits - logits.amax(dim=1, keepdim=True).detach()
    return logits.view(-1, classes, length)


def contrast_from_logits(logits: Tensor, positives: Tensor) -> Tensor:
    """``l(y)`` per row of :func:`bank_logits`, ``y = positives[r]``: the mean over the bank entries of
    class ``y`` of ``-log(e^{s_p} / (e^{s_p} + sum_n e^{s_n}))``, ``n`` the entries of the other classes."""
    own = F.one_hot(positives, logits.shape[1]).bool()[..., None]
    negatives = logits.exp().masked_fill(own, 0.0).sum(dim=(1, 2))
    positive = logits.gather(1, positives.view(-1, 1, 1).expand(-1, 1, logits.shape[2])).squeeze(1)
    return -(positive - torch.log((negatives[:, None] + positive.exp()).clamp(min=1e-4))).mean(dim=1)


def memory_contrast(anchor: Tensor, memory: Tensor, positive: int, temperature: float) -> Tensor:
    """``l(positive)``: the bank ``memory`` (``K x L x D``) entries of class ``positive`` against the
    others, for one ``anchor`` embedding (cosine similarities over ``temperature``)."""
    logits = bank_logits(anchor[None], memory, temperature)
    return contrast_from_logits(logits, torch.tensor([positive], device=memory.device))[0]


@dataclass(frozen=True)
class RegionMix:
    """The mix-up of image ``image``'s region of class ``cls`` with ``partner``'s region of ``partner_cls``."""

    image: int
    cls: int
    partner: int
    partner_cls: int
    lam: float


def draw_mixes(labels: Tensor, alpha: float, rng: np.random.Generator) -> list[RegionMix]:
    """Per image and present class: a random image of the batch, one of its present classes, and
    ``lam ~ Beta(alpha, alpha)`` (a fresh permutation per region, as ``rca.py``). A partner with no
    class leaves the region unmixed (``lam = 1``)."""
    mixes = []
    batch = labels.shape[0]
    for image in range(batch):
        for cls in labels[image].nonzero().flatten().tolist():
            partner = int(rng.permutation(batch)[image])
            present = labels[partner].nonzero().flatten().tolist()
            if not present:
                mixes.append(RegionMix(image, cls, image, cls, 1.0))
                continue
            partner_cls = int(present[int(rng.integers(len(present)))])
            mixes.append(RegionMix(image, cls, partner, partner_cls, float(rng.beta(alpha, alpha))))
    return mixes


def rca_contrast(
    mid: Tensor, coarse_cams: Tensor, memory: Tensor, mixes: list[RegionMix], temperature: float
) -> Tensor:
    """``L_contrast``: per image, the mean over its regions of ``lam l(c) + (1 - lam) l(c')`` for the
    mixed embedding of ``mid`` (``B x D x h x w``); summed over the images."""
    if not mixes:
        return mid.sum() * 0.0
    anchors = []
    for mix in mixes:
        own = region_embedding(mid[mix.image], region_mask(coarse_cams[mix.image], mix.cls))
        other = region_embedding(mid[mix.partner], region_mask(coarse_cams[mix.partner], mix.partner_cls))
        anchors.append(own * mix.lam + (1 - mix.lam) * other)
    logits = bank_logits(torch.stack(anchors), memory, temperature)
    device = mid.device
    lam = torch.tensor([mix.lam for mix in mixes], dtype=logits.dtype, device=device)
    first = contrast_from_logits(logits, torch.tensor([mix.cls for mix in mixes], device=device))
    second = contrast_from_logits(logits, torch.tensor([mix.partner_cls for mix in mixes], device=device))
    losses = lam * first + (1 - lam) * second
    rows: dict[int, list[int]] = {}
    for row, mix in enumerate(mixes):
        rows.setdefault(mix.image, []).append(row)
    return torch.stack([losses[index].mean() for index in rows.values()]).sum()


def kmeans(
    points: Tensor, k: int, generator: torch.Generator, iterations: int = 100, tol: float = 1e-4
) -> Tensor:
    """``k x D`` centres of ``N x D`` points: k-means++ start, then Lloyd iterations (Euclidean)."""
    n = points.shape[0]
    centres = [points[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.stack(centres)).amin(dim=1).pow(2)
        total = dist.sum()
        if total <= 0:
            centres.append(points[int(torch.randint(n, (1,), generator=generator))])
            continue
        centres.append(points[int(torch.multinomial(dist / total, 1, generator=generator))])
    centre = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(points, centre).argmin(dim=1)
        moved = centre.clone()
        for j in range(k):
            members = points[assign == j]
            if members.numel():
                moved[j] = members.mean(dim=0)
        shift = (moved - centre).pow(2).sum()
        centre = moved
        if shift <= tol:
            break
    return centre


class RegionMemory(nn.Module):
    """The per-class bank of region embeddings, its pointers and its cluster centres (buffers: saved
    with the run, so pseudo-labelling aggregates over the trained bank's clusters)."""

    def __init__(self, num_classes: int, dim: int, length: int, clusters: int) -> None:
        super().__init__()
        self.register_buffer("queue", torch.randn(num_classes, length, dim))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("centres", torch.randn(num_classes, clusters, dim))

    @torch.no_grad()
    def update(self, features: Tensor, coarse_cams: Tensor, labels: Tensor, probs: Tensor, momentum: float,
               threshold: float) -> None:  # fmt: skip
        """Enqueue each confident present class's region embedding of ``features`` (``_dequeue_and_enqueue``)."""
        length = self.queue.shape[1]
        for b in range(labels.shape[0]):
            for cls in labels[b].nonzero().flatten().tolist():
                if probs[b, cls] <= threshold:
                    continue
                embedding = region_embedding(features[b], region_mask(coarse_cams[b], cls))
                slot = int(self.pointer[cls])
                self.queue[cls, slot] = self.queue[cls, slot] * momentum + embedding * (1 - momentum)
                self.pointer[cls] = (slot + 1) % length

    @torch.no_grad()
    def recluster(self, generator: torch.Generator) -> None:
        for cls in range(self.queue.shape[0]):
            self.centres[cls] = kmeans(self.queue[cls].float(), self.centres.shape[1], generator).to(
                self.centres
            )


class SemanticAggregation(nn.Module):
    """Pixels attend to the bank's cluster centres: ``P([x, A((Q(x) K(c)^T) * scale) V(c)])``."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.aggregate = nn.Conv2d(channels, channels, 1)
        self.project = nn.Conv2d(2 * channels, channels, 1)
        self.scale = scale
        for conv in (self.query, self.aggregate, self.project):  # rca.py: every Conv2d ~ N(0, 0.01)
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, centres: Tensor) -> Tensor:
        b, c, h, w = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)  # B x hw x C
        centres = centres.detach().to(x.dtype)
        similarity = query @ self.key(centres).t() * self.scale  # B x hw x N
        context = (similarity @ self.value(centres)).transpose(1, 2).reshape(b, c, h, w)
        return self.project(torch.cat([x, self.aggregate(context)], dim=1))


class RefinedCamExtractor(CamExtractor):
    """CAMs of RCA's refined branch: the backbone's features aggregated over the trained bank's clusters."""

    def __init__(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.modules = modules

    def raw_maps(self, batch: Tensor) -> Tensor:
        memory = self.modules["memory"]
        maps = self.modules["head"](
            self.modules["aggregation"](self.model.features(batch), memory.centres.flatten(0, 1))
        )
        return F.relu(maps) if self.normalization == "max" else maps


@register_method
class Rca(Method):
    name = "rca"
    description = (
        "RCA (Zhou et al., CVPR 2022): a per-class memory bank of region embeddings; regional semantic "
        "contrast with mix-up against the bank, pixels aggregating the bank's k-means centres before a refined "
        "classifier whose CAMs make the pseudo-labels."
    )
    deviations = (
        "Refined classifier: one bias-free 1x1 convolution (official: per class three 512-channel 3x3 "
        "convolutions and a 1x1); extra_F: 1x1 convolutions at the backbone's width (official: 3x3 at 512). "
        "Clusters every cluster_every optimiser steps by a seeded torch k-means (official: each epoch, "
        "scikit-learn). Each region is cut from unmasked features (official: masked in place, so an image's "
        "second class is cut from its first's region). Pseudo-labels from the refined CAMs at the end, read at "
        "the run's background threshold (official: OAA's accumulated maps, min-max normalised, saliency "
        "background, dense CRF, ignore rules of gen_labels.py). Warm-up: 2/30 of the budget (official: 2 of 30 epochs)."
    )

    def __init__(
        self,
        queue_length: int = 500,
        clusters: int = 10,
        momentum: float = 0.99,
        temperature: float = 0.07,
        contrast_weight: float = 0.01,
        coarse_weight: float = 0.4,
        mix_alpha: float = 8.0,
        enqueue_threshold: float = 0.7,
        warm_up: float = 2 / 30,
        cluster_every: int = 100,
    ) -> None:
        if queue_length < clusters or clusters < 1:
            raise ValueError(f"need 1 <= clusters <= queue_length; got {clusters} and {queue_length}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        if temperature <= 0 or mix_alpha <= 0 or cluster_every < 1:
            raise ValueError("temperature and mix_alpha must be positive, cluster_every at least 1")
        super().__init__(
            queue_length=queue_length, clusters=clusters, momentum=momentum, temperature=temperature,
            contrast_weight=contrast_weight, coarse_weight=coarse_weight, mix_alpha=mix_alpha,
            enqueue_threshold=enqueue_threshold, warm_up=warm_up, cluster_every=cluster_every,
        )  # fmt: skip
        self.queue_length = queue_length
        self.clusters = clusters
        self.momentum = momentum
        self.temperature = temperature
        self.contrast_weight = contrast_weight
        self.coarse_weight = coarse_weight
        self.mix_alpha = mix_alpha
        self.enqueue_threshold = enqueue_threshold
        self.warm_up = warm_up
        self.cluster_every = cluster_every
        self.generator = torch.Generator().manual_seed(0)  # k-means starts
        self.rng = np.random.default_rng(0)  # the mix-up draws (rca.py: torch.randperm, np.random.beta)

    def extra_modules(self, feature_dim: int, num_classes: int) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "memory": RegionMemory(num_classes, feature_dim, self.queue_length, self.clusters),
                "aggregation": SemanticAggregation(feature_dim, AGGREGATION_SCALE / self.clusters),
                "head": nn.Conv2d(feature_dim, num_classes, kernel_size=1, bias=False),
                "mid": nn.Sequential(
                    nn.Conv2d(feature_dim, feature_dim, 1),
                    nn.BatchNorm2d(feature_dim),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(feature_dim, feature_dim, 1),
                ),
            }
        )

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        step = int(batch["step"]) if "step" in batch else 0
        # rca.py: at an epoch's start, before its forward (once per step under gradient accumulation)
        if step > 0 and step % self.cluster_every == 0 and self.first_pass_of_step("recluster", batch):
            modules["memory"].recluster(self.generator)
        out = model(batch["image"])
        refined = modules["head"](
            modules["aggregation"](out["features"], modules["memory"].centres.flatten(0, 1))
        )
        return {
            "logits": model.pool(refined),
            "cams": refined,
            "features": out["features"],
            "coarse_logits": out["logits"],
            "coarse_cams": out["cams"],
        }

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        labels = batch["label"]
        coarse = outputs["coarse_cams"].detach()
        memory = modules["memory"]
        losses = {
            "coarse_cls": self.coarse_weight
            * F.binary_cross_entropy_with_logits(outputs["coarse_logits"], labels)
        }
        if float(batch.get("progress", torch.tensor(1.0))) >= self.warm_up:
            mid = modules["mid"](outputs["features"])
            mixes = draw_mixes(labels, self.mix_alpha, self.rng)
            losses["contrast"] = self.contrast_weight * rca_contrast(
                mid, coarse, memory.queue, mixes, self.temperature
            )
        memory.update(
            outputs["features"].detach(), coarse, labels, outputs["logits"].detach().sigmoid(),
            self.momentum, self.enqueue_threshold,
        )  # fmt: skip
        return losses

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return RefinedCamExtractor(model, modules, **kwargs)
