"""BECO: boundary-enhanced co-training of two segmenters on noisy pseudo-labels (Rong et al., CVPR 2023).

Two networks of the same architecture, started independently, learn from the pseudo-labels where
those are *confident* and from each other where they are not:

- **confidence** (the official first stage's ``gen_mask.py``): per pseudo-label class, the half of
  its pixels with the largest margin between the best and the second-best CAM score;
- **cross-entropy** on confident pixels, weighted ``1 + w * boundary``;
- **co-training**: on the other pixels each network learns the other's argmax;
- **ClassMix** of pairs in a batch (half of the second image's classes pasted onto the first); after a
  warm-up the pasted region and the targets come from the two networks' averaged prediction where it
  is confident (softmax > ``threshold``), and the pasted region's boundary (a ``2 * size + 1`` dilation
  minus erosion) is up-weighted, because the pasted edges are where the online labels are exact.

Prediction averages the two networks' logits. Faithful to the official ``models/train_beco.py`` and
``datasets/transforms/imgmix.py`` (default weights 0.2 on the boundary for the cross-entropy, 0 for
co-training; mix probability 0.5; threshold 0.95), with these deviations:

- the warm-up is a fraction of the time budget (default 0.1) instead of one of 80 epochs, as budgets
  here are minutes, not epochs;
- the official strong colour augmentation after mixing is replaced by the domain's own augmentation
  (applied per crop before mixing);
- pixels the pseudo-label leaves unassigned (glass, no-data, padding: the ignore index) carry no
  co-training loss either, as everywhere in the segmenter;
- background is never excluded from the pasted classes (the official ``ignore_bg`` is for VOC's
  background class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.segmentation.task import SegmenterTask

CONFIDENT_FRACTION = 0.5  # gen_mask.py's ``thd``


@dataclass(frozen=True)
class BecoOptions:
    """BECO's weights and schedule (official defaults, ``configs/beco.json``)."""

    mix_probability: float = 0.5
    boundary_size: int = 1
    boundary_weight_1: float = 0.2  # cross-entropy of network 1 on the pasted boundary
    boundary_weight_2: float = 0.2  # and of network 2
    threshold: float = 0.95  # online labels: the averaged softmax above it
    warm_up: float = 0.1  # fraction of the training budget before online labels (official: 1 of 80 epochs)


def confidence_mask(
    scores: Tensor, labels: Tensor, ignore_index: int, fraction: float = CONFIDENT_FRACTION
) -> Tensor:
    """``H x W`` booleans: per class of ``labels``, the ``fraction`` of its pixels with the largest
    margin between the top two ``scores`` (``C x H x W``; with one channel, its score).

    As ``gen_mask.py``: ``floor(n // (1 / fraction))`` pixels of each class, by descending margin.
    """
    if scores.shape[0] > 1:
        top = scores.float().topk(2, dim=0).values
        margin = top[0] - top[1]
    else:
        margin = scores[0].float()
    confident = torch.zeros(labels.shape, dtype=torch.bool)
    flat_margin = margin.flatten()
    flat_labels = labels.flatten()
    out = confident.flatten()
    for value in flat_labels.unique().tolist():
        if value == ignore_index:
            continue
        where = (flat_labels == value).nonzero().flatten()
        keep = int(where.numel() // (1 / fraction))
        if keep:
            best = flat_margin[where].argsort(descending=True, stable=True)[:keep]
            out[where[best]] = True
    return out.view(labels.shape)


def encode_confidence(labels: Tensor, confident: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """One target map that carries confidence through crops, flips and rotations: class ``c`` where
    confident, ``num_classes + c`` where not, the ignore index unchanged."""
    unsure = (~confident) & (labels != ignore_index)
    return torch.where(unsure, labels + num_classes, labels)


def decode_confidence(target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The class ids (ignore index kept) and a confident mask of an :func:`encode_confidence` map."""
    assigned = target != ignore_index
    unsure = assigned & (target >= num_classes)
    return torch.where(unsure, target - num_classes, target), assigned & ~unsure


def region_boundary(region: Tensor, size: int = 1) -> Tensor:
    """``B x H x W`` float: the dilation minus the erosion of a 0/1 ``region`` by a ``2 * size + 1``
    square (pixels outside the image do not count, as OpenCV's default border)."""
    k = 2 * size + 1
    x = region.float()[:, None]
    dilated = F.max_pool2d(x, k, stride=1, padding=size)
    eroded = -F.max_pool2d(-x, k, stride=1, padding=size)
    return (dilated - eroded)[:, 0]


def random_class_region(
    labels: Tensor, ignore_index: int, generator: torch.Generator | None = None
) -> Tensor:
    """``H x W`` 0/1: the pixels of ``ceil(n / 2)`` of the ``n`` classes of ``labels``, drawn at random."""
    classes = labels.unique()
    classes = classes[classes != ignore_index]
    if classes.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.float)
    count = (classes.numel() + classes.numel() % 2) // 2
    picked = classes[
        torch.randperm(classes.numel(), generator=generator, device="cpu")[:count].to(classes.device)
    ]
    return torch.isin(labels, picked).float()


def class_mix(
    images: Tensor,
    labels: Tensor,
    confident: Tensor,
    options: BecoOptions,
    ignore_index: int,
    online: tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ClassMix of the batch's first half with its second half, both ways (``imgmix.py``).

    Each pair ``(a, b)`` becomes ``a`` with a random half of ``b``'s classes pasted over it, and ``b``
    with ``a``'s; each is mixed with probability ``mix_probability``, else kept with its own
    ``labels`` and ``confident`` mask. Without ``online`` (the warm-up) a mixed image's targets and
    pasted classes come from ``labels``, and no boundary is marked. With ``online`` (the networks'
    labels and confident mask) they come from those: the pasted classes from the confident online
    labels, the targets of the whole mixed image from the online ones, and the pasted region's
    boundary is returned for up-weighting. Returns images, labels, confident masks, boundaries.
    """
    half = images.shape[0] // 2  # an odd batch's last crop stays unmixed (the official code asserts even)
    if online is None:
        mix_labels, mix_confident, regions = labels, confident, labels
    else:
        mix_labels, mix_confident = online
        regions = mix_labels.masked_fill(~mix_confident, ignore_index)
    out_images, out_labels, out_conf, out_bdry = [], [], [], []
    for first in range(half):
        for down, up in ((first, first + half), (first + half, first)):
            bdry = torch.zeros(labels.shape[-2:], device=labels.device)
            if float(torch.rand((), generator=generator)) < options.mix_probability:
                alpha = random_class_region(regions[up], ignore_index, generator)
                if online is not None:
                    bdry = region_boundary(alpha[None], options.boundary_size)[0]
                keep = alpha.bool()
                image = torch.where(keep[None], images[up], images[down])
                label = torch.where(keep, mix_labels[up], mix_labels[down])
                conf = torch.where(keep, mix_confident[up], mix_confident[down])
            else:
                image, label, conf = images[down], labels[down], confident[down]
            out_images.append(image)
            out_labels.append(label)
            out_conf.append(conf)
            out_bdry.append(bdry)
    if images.shape[0] % 2:
        out_images.append(images[-1])
        out_labels.append(labels[-1])
        out_conf.append(confident[-1])
        out_bdry.append(torch.zeros(labels.shape[-2:], device=labels.device))
    return torch.stack(out_images), torch.stack(out_labels), torch.stack(out_conf), torch.stack(out_bdry)


def beco_loss(
    logits_1: Tensor,
    logits_2: Tensor,
    labels: Tensor,
    confident: Tensor,
    boundary: Tensor,
    options: BecoOptions,
    ignore_index: int,
) -> dict[str, Tensor]:
    """The four terms of ``train_beco.py``, each a mean over every pixel of the batch.

    ``ce_i``: cross-entropy to ``labels`` on confident pixels, weighted ``1 + w_i * boundary``;
    ``cot_i``: cross-entropy to the other network's argmax on assigned, unconfident pixels.
    """
    assigned = labels != ignore_index
    conf = (confident & assigned).float()
    unsure = (~confident & assigned).float()
    safe = labels.masked_fill(~assigned, 0)
    ce_1 = F.cross_entropy(logits_1, safe, reduction="none") * conf
    ce_2 = F.cross_entropy(logits_2, safe, reduction="none") * conf
    cot_1 = F.cross_entropy(logits_1, logits_2.detach().argmax(1), reduction="none") * unsure
    cot_2 = F.cross_entropy(logits_2, logits_1.detach().argmax(1), reduction="none") * unsure
    return {
        "ce_1": (ce_1 * (1 + options.boundary_weight_1 * boundary)).mean(),
        "ce_2": (ce_2 * (1 + options.boundary_weight_2 * boundary)).mean(),
        "cot_1": cot_1.mean(),
        "cot_2": cot_2.mean(),
    }


class CoTrainedPair(nn.Module):
    """Two segmenters whose prediction is the mean of their logits (BECO's ``forward_cat_test``)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    @property
    def networks(self) -> tuple[nn.Module, nn.Module]:
        return self.first, self.second

    def forward(self, x: Tensor) -> Tensor:
        return (self.first(x) + self.second(x)) / 2


class BecoTask(SegmenterTask):
    """The segmenter task for a :class:`CoTrainedPair`: batches carry :func:`encode_confidence` targets."""

    def __init__(
        self,
        model: CoTrainedPair,
        num_classes: int,
        ignore_index: int,
        options: BecoOptions | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(model, num_classes, ignore_index, **kwargs)  # type: ignore[arg-type]
        self.options = options or BecoOptions()
        self.num_classes = num_classes

    @torch.no_grad()
    def online_labels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The pair's labels of ``images`` (eval mode, logits averaged) and where their softmax is confident."""
        self.model.eval()
        try:
            probs = self.model(images).float().softmax(1)
        finally:
            self.model.train()
        top, labels = probs.max(1)
        return labels, top > self.options.threshold

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        labels, confident = decode_confidence(batch["mask"], self.num_classes, self.ignore_index)
        online = self.online_labels(images) if self.training_progress >= self.options.warm_up else None
        images, labels, confident, boundary = class_mix(
            images, labels, confident, self.options, self.ignore_index, online
        )
        first, second = self.model.networks
        logits_1, logits_2 = first(images), second(images)
        terms = beco_loss(logits_1, logits_2, labels, confident, boundary, self.options, self.ignore_index)
        loss = sum(terms.values(), logits_1.sum() * 0.0)
        size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.train_iou.update(((logits_1 + logits_2) / 2).detach().argmax(1), labels)
        self.log("train/miou_vs_pseudo_labels", self.train_iou, on_step=False, on_epoch=True, batch_size=size)
        return loss
