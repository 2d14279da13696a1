"""Das et al.: weakly supervised domain adaptation by prototypical contrast (CVPR 2023).

Why: a user often holds pixel masks of a *source* dataset (a public one, another scanner, another
city) and only image-level labels of their own *target* images. Das et al. train one segmenter on
both: full supervision on the source, the image labels and a teacher's confident labels on the
target, and per-class prototypes of each domain that pull the two domains' features of a class
together. As the official code (anurag-198/WDASS: ``train.py``, ``loss/image_label.py``,
``loss/contrast_loss.py``, ``loss/contrast_loss_intra.py``, ``utils/prototypes.py``,
``utils/ema_classes.py``'s ``ema_cls_2``, ``transforms/dacs_transforms.py``) in its image-label
configuration (``--weak_label image --imloss --improto --use_contrast --bn_buffer``):

- **source**: cross-entropy on the source masks;
- **teacher and mixing (DACS)**: a teacher, the exponential moving average (0.999) of every weight and
  buffer of the student, labels the target crops; half of the source batch's classes are pasted
  onto them (ClassMix) and the student learns the mix, target pixels weighted by the fraction of
  the teacher's pixels with softmax >= 0.968, and only where it is that confident;
- **image-level loss** on the target: per class, log-mean-exp pooling of the logits over the pixels,
  a sigmoid, binary cross-entropy with the crop's labels; the same on the features' dot products
  with the target prototypes;
- **prototypes**, one per class and domain, recomputed each step from detached features (an
  L2-normalised 256-channel projection): the class's mean feature, then the class's features weighted
  by their dot product with it (weights summing to one); target pixels are labelled by the teacher
  where its softmax is >= 0.95; a class absent from a step keeps its previous prototype;
- **prototypical contrast** (temperature 0.1, times 0.1/0.07): per image and class of more than 20
  labelled feature pixels, up to 20 anchors (the wrongly predicted first, then confident correct
  ones), each contrasted with the prototypes of the anchors' classes, the negatives summed per row:
  inter-domain (weight 0.5; source anchors and the teacher's target anchors against the target
  prototypes, positives only across domains), source (0.25; source prototypes) and target (0.25; the
  student's own labels, target prototypes);
- the image-level and contrast terms start after a warm-up (official: iteration 10,000 of 150,000).

Deviations: the warm-up is that fraction (1/15) of the time budget; the projection reads the
decoder's output (official: DeepLabV2's stride-8 backbone features) and the per-feature-pixel
predictions are the logits average-pooled to the features' grid (official: the ASPP logits before
upsampling); the teacher runs in eval mode (segmentation-models-pytorch's ASPP has dropout); the
crop's image labels are the classes of its pseudo-label (official: of its ground truth) and pixels the
pseudo-label leaves unassigned (padding, glass, no-data) carry no loss and no pooling; the official
colour jitter and blur after mixing are replaced by the domain's augmentation of each crop before it
(as for BECO); the edge loss of the official network (a boundary term on the source) and its
Cityscapes-specific zero weights of the top 15 and bottom 120 rows are left out; the optimiser is
the segmenter's (AdamW), not SGD with a poly schedule.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.segmentation.task import SegmenterTask


@dataclass(frozen=True)
class DasOptions:
    """Weights and thresholds of the official image-label configuration (``command_line/arguments.py``)."""

    ema: float = 0.999  # --alpha
    mix_threshold: float = 0.968  # DACS: teacher pixels that weigh in the mixed loss
    prototype_threshold: float = 0.95  # teacher pixels that shape the target prototypes
    contrast_weight: float = 1.0  # --contrast_wt
    inter_weight: float = 0.5  # --c_inter
    source_weight: float = 0.25  # --c_syn
    target_weight: float = 0.25  # --c_real
    warm_up: float = 10_000 / 150_000  # image-level and contrast terms off before (fraction of the budget)
    feature_dim: int = 256


def image_level_loss(logits: Tensor, classes: Tensor, valid: Tensor | None = None) -> Tensor:
    """``ImageLevelLoss``: BCE of sigmoid(log-mean-exp over pixels) of each class's ``B x C x H x W``
    logits against the ``B x C`` 0/1 ``classes``; ``valid`` (``B x H x W``) limits the pooled pixels."""
    flat = logits.flatten(2).float()
    if valid is None:
        count = torch.full(flat.shape[:1], flat.shape[-1], device=flat.device, dtype=flat.dtype)
    else:
        keep = valid.flatten(1)[:, None, :]
        flat = flat.masked_fill(~keep, float("-inf"))
        count = keep.sum(-1).clamp(min=1).to(flat.dtype)[:, 0]
    pooled = torch.logsumexp(flat, 2) - count.log()[:, None]
    # F.binary_cross_entropy written out (logs clamped at -100 as it does): it refuses to run under autocast.
    p, y = torch.sigmoid(pooled), classes.float()
    return -(y * p.log().clamp(min=-100) + (1 - y) * (1 - p).log().clamp(min=-100)).mean()


@torch.no_grad()
def update_prototypes(prototypes: Tensor, features: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``prototypes.get_prototypes``: each class of ``labels`` (``B x h x w``, on the ``B x D x h x w``
    feature grid) gets the sum of its features weighted by their (normalised) dot product with the
    class's mean feature; other rows keep their value. Updates ``prototypes`` (``C x D``) in place."""
    flat = features.detach().permute(0, 2, 3, 1)
    for cls in labels.unique():
        if int(cls) == ignore_index or int(cls) >= prototypes.shape[0]:
            continue
        members = flat[labels == cls]
        center = members.sum(0) / members.shape[0]
        weights = members @ center
        weights = weights / weights.sum()
        prototypes[int(cls)] = (weights[:, None] * members).sum(0)
    return prototypes


def sample_anchors(
    features: Tensor,
    labels: Tensor,
    predictions: Tensor,
    probabilities: Tensor,
    ignore_index: int,
    max_samples: int,
    max_views: int = 20,
    threshold: float = 0.95,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``_hard_anchor_sampling``: ``A x V x D`` anchor features, their classes and their image index.

    ``features`` ``B x N x D``; ``labels``, ``predictions``, ``probabilities`` ``B x N``. Per image, the
    classes with more than ``max_views`` labelled pixels; ``V = min(max_samples // classes, max_views)``
    per class: wrongly predicted pixels first, then correctly predicted ones above ``threshold``; a
    class with fewer than ``V`` of both is skipped. None when no class qualifies.
    """
    per_image = []
    for image_labels in labels:
        classes = [c for c in image_labels.unique() if int(c) != ignore_index]
        per_image.append([c for c in classes if int((image_labels == c).sum()) > max_views])
    total = sum(len(classes) for classes in per_image)
    if total == 0:
        return None
    views = min(max_samples // total, max_views)
    chosen, classes_of, image_of = [], [], []
    for index, classes in enumerate(per_image):
        label, prediction, probability = labels[index], predictions[index], probabilities[index]
        for cls in classes:
            hard = ((label == cls) & (prediction != cls)).nonzero()
            easy = ((label == cls) & (prediction == cls) & (probability > threshold)).nonzero()
            if hard.shape[0] >= views:
                keep_hard, keep_easy = views, 0
            elif hard.shape[0] + easy.shape[0] >= views:
                keep_hard, keep_easy = hard.shape[0], views - hard.shape[0]
            else:
                continue
            if keep_hard > 0:  # random draws in the official order (CPU generator), so a seed replays them
                hard = hard[torch.randperm(hard.shape[0])[:keep_hard].to(hard.device)]
            if keep_easy > 0:
                easy = easy[torch.randperm(easy.shape[0])[:keep_easy].to(easy.device)]
            picked = hard if keep_hard == views else easy if keep_easy == views else torch.cat([hard, easy])
            chosen.append(features[index, picked[:, 0]])
            classes_of.append(cls)
            image_of.append(index)
    if not chosen:
        return features.new_zeros((0, views, features.shape[-1])), labels.new_zeros(0), labels.new_zeros(0)
    device = features.device
    return torch.stack(chosen), torch.stack(classes_of), torch.tensor(image_of, device=device)


def prototype_contrast(
    anchors: Tensor,
    classes: Tensor,
    prototypes: Tensor,
    domains: Tensor | None = None,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> Tensor:
    """``_contrastive``: each of the ``A x V`` anchors (``A x V x D``) against the prototype of every
    anchor's class, positives of the anchor's class (with ``domains``: only those of another domain),
    the exponentials of its negatives summed per row."""
    count, views = anchors.shape[:2]
    if count == 0:
        return anchors.sum() * 0.0
    labels = classes.reshape(-1, 1)
    same = (labels == labels.T).float()
    positives = same
    if domains is not None:
        d = domains.reshape(-1, 1)
        positives = same * (d != d.T).float()
    rows = torch.cat(torch.unbind(anchors, 1), 0)  # view-major: anchor a of view v at v * A + a
    columns = prototypes[classes.long()].repeat(views, 1)
    logits = rows @ columns.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    same = same.repeat(views, views)
    positives = positives.repeat(views, views)
    negatives = (logits.exp() * (1 - same)).sum(1, keepdim=True)
    log_prob = logits - torch.log(logits.exp() + negatives)
    mean_positive = (positives * log_prob).sum(1) / (positives.sum(1) + 1e-8)
    loss = (-(temperature / base_temperature) * mean_positive).mean()
    return torch.nan_to_num(loss, nan=0.0)


def class_mix_masks(source_labels: Tensor) -> Tensor:
    """``get_class_masks``: per image, the pixels of half (rounded up) of the classes of the whole
    batch's labels (the official quirk, any ignore id included), drawn at random."""
    classes = source_labels.unique()
    masks = []
    for label in source_labels:
        order = torch.randperm(classes.shape[0])[: math.ceil(classes.shape[0] / 2)]
        picked = classes[order.to(classes.device)]
        masks.append(torch.isin(label, picked))
    return torch.stack(masks)


class DasTask(SegmenterTask):
    """The segmenter task of Das et al.: batches carry target crops (``image``, ``mask``: pseudo-labels,
    read for the crop's classes and unassigned pixels only) and source crops (``source_image``,
    ``source_mask``: ground truth mapped to the label space)."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        ignore_index: int,
        options: DasOptions | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(model, num_classes, ignore_index, **kwargs)  # type: ignore[arg-type]
        self.options = options or DasOptions()
        self.num_classes = num_classes
        channels = _decoder_channels(model)
        self.representation = nn.Conv2d(channels, self.options.feature_dim, 1)
        self.teacher = copy.deepcopy(nn.ModuleDict({"model": model, "representation": self.representation}))
        self.teacher.requires_grad_(False)
        self.teacher_step = 0  # the optimiser step the teacher was last updated after
        self.register_buffer("source_prototypes", torch.zeros(num_classes, self.options.feature_dim))
        self.register_buffer("target_prototypes", torch.zeros(num_classes, self.options.feature_dim))

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.representation.parameters())

    @torch.no_grad()
    def update_teacher(self) -> None:
        """``ema_cls_2._update_ema``: every state entry, buffers included; batch counters copied."""
        student = {"model": self.model, "representation": self.representation}
        for name, part in student.items():
            ema_state = self.teacher[name].state_dict()
            for key, value in part.state_dict().items():
                if "num_batches_tracked" in key:
                    ema_state[key].copy_(value)
                else:
                    ema_state[key].copy_(ema_state[key] * self.options.ema + (1 - self.options.ema) * value)

    def on_train_start(self) -> None:
        self.teacher_step = self.global_step  # a resumed run's first batch is not an optimiser step yet

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        # After each optimiser step: with --accumulate-batches a batch that only accumulated a
        # gradient leaves global_step (and the teacher) as they were.
        if self.global_step != self.teacher_step:
            self.update_teacher()
            self.teacher_step = self.global_step

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        o, ignore = self.options, self.ignore_index
        target, target_mask = batch["image"], batch["mask"]
        source, source_mask = batch["source_image"], batch["source_mask"]
        valid = target_mask != ignore
        classes = _crop_classes(target_mask, self.num_classes, ignore)
        weak_on = self.training_progress >= o.warm_up

        logits_t, features_t, low_t = forward_features(self.model, self.representation, target)
        logits_s, features_s, low_s = forward_features(self.model, self.representation, source)
        seg_source = _masked_cross_entropy(logits_s, source_mask, ignore)
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits, teacher_features, teacher_low = forward_features(
                self.teacher["model"], self.teacher["representation"], target
            )
            prob, pseudo = teacher_logits.float().softmax(1).max(1)
            low_prob, low_pseudo = teacher_low.float().softmax(1).max(1)
            low_pseudo = low_pseudo.masked_fill(low_prob < o.prototype_threshold, ignore)
            low_pseudo = low_pseudo.masked_fill(~_nearest(valid, low_pseudo.shape[-2:]), ignore)
            source_low = _nearest(source_mask, features_s.shape[-2:])
            update_prototypes(self.target_prototypes, teacher_features, low_pseudo, ignore)
            update_prototypes(self.source_prototypes, features_s, source_low, ignore)

        # DACS: source classes pasted onto the target, the teacher's confident labels elsewhere.
        confident = prob >= o.mix_threshold
        fraction = confident.sum().item() / confident.numel()
        paste = class_mix_masks(source_mask)
        mixed = torch.where(paste[:, None], source, target)
        mixed_labels = torch.where(paste, source_mask, pseudo.masked_fill(~valid, ignore))
        weights = torch.where(paste, torch.ones_like(prob), fraction * confident.float())
        seg_mixed = _masked_cross_entropy(self.model(mixed), mixed_labels, ignore, weights)
        loss = seg_mixed + seg_source
        terms = {"seg_source": seg_source, "seg_mixed": seg_mixed}

        if weak_on:
            low_valid = _nearest(valid, low_t.shape[-2:])
            prototype_logits = torch.einsum("bdhw,cd->bchw", features_t, self.target_prototypes)
            image = image_level_loss(logits_t, classes, valid) + image_level_loss(
                prototype_logits, classes, low_valid
            )
            s_prob, s_pred = low_s.detach().float().softmax(1).max(1)
            t_prob, t_pred = low_t.detach().float().softmax(1).max(1)
            inter = self._inter(
                features_s, source_low, s_pred, s_prob, teacher_features, low_pseudo, low_prob
            )
            source_term = self._intra(features_s, source_low, s_pred, s_prob, self.source_prototypes)
            own = t_pred.masked_fill(~low_valid, ignore)
            target_term = self._intra(features_t, own, own, t_prob, self.target_prototypes)
            contrast = o.contrast_weight * (
                o.inter_weight * inter + o.target_weight * target_term + o.source_weight * source_term
            )
            loss = loss + contrast + image
            terms.update(image_level=image, contrast=contrast)
        size = target.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def _inter(self, f_s: Tensor, y_s: Tensor, p_s: Tensor, q_s: Tensor,
               f_t: Tensor, y_t: Tensor, q_t: Tensor) -> Tensor:  # fmt: skip
        """``contrast_loss.PixelContrastLoss``: source and teacher target anchors, target prototypes."""
        features = torch.cat([f_s, f_t]).permute(0, 2, 3, 1).flatten(1, 2)
        labels = torch.cat([y_s, y_t]).flatten(1)
        predictions = torch.cat([p_s, y_t]).flatten(1)
        probabilities = torch.cat([q_s, q_t]).flatten(1)
        sampled = sample_anchors(features, labels, predictions, probabilities, self.ignore_index, 512)
        if sampled is None:
            return f_s.sum() * 0.0
        anchors, classes, images = sampled
        domains = (images >= f_s.shape[0]).long()  # the official ``btch``: 0 source, 1 target
        return prototype_contrast(anchors, classes, self.target_prototypes, domains)

    def _intra(self, features: Tensor, labels: Tensor, predictions: Tensor, probabilities: Tensor,
               prototypes: Tensor) -> Tensor:  # fmt: skip
        """``contrast_loss_intra.PixelContrastLoss``: labels where known, else the prediction."""
        labels = torch.where(labels == self.ignore_index, predictions, labels)
        sampled = sample_anchors(
            features.permute(0, 2, 3, 1).flatten(1, 2), labels.flatten(1), predictions.flatten(1),
            probabilities.flatten(1), self.ignore_index, 256, threshold=0.96,
        )  # fmt: skip
        if sampled is None:
            return features.sum() * 0.0
        return prototype_contrast(sampled[0], sampled[1], prototypes)


def forward_features(
    model: nn.Module, representation: nn.Module, images: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, L2-normalised projected decoder features, and the logits pooled to the features' grid."""
    captured: list[Tensor] = []
    handle = model.decoder.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = model(images)
    finally:
        handle.remove()
    features = F.normalize(representation(captured[-1]), dim=1)
    return logits, features, F.adaptive_avg_pool2d(logits, features.shape[-2:])


def _decoder_channels(model: nn.Module) -> int:
    """Output channels of an smp model's decoder (the segmentation head's input)."""
    head = model.segmentation_head[0]
    return int(head.in_channels)


def _crop_classes(mask: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``B x C`` 0/1: the classes each crop's label map holds."""
    present = torch.zeros(mask.shape[0], num_classes, device=mask.device)
    for index, labels in enumerate(mask):
        ids = labels.unique()
        ids = ids[(ids != ignore_index) & (ids < num_classes)]
        present[index, ids] = 1
    return present


def _nearest(labels: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Label maps (or masks) resized to ``size`` by nearest neighbour, as the official interpolations."""
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return resized.bool() if labels.dtype == torch.bool else resized.long()


def _masked_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int, weights: Tensor | None = None
) -> Tensor:
    """``EdgeLoss``'s segmentation term: per-pixel cross-entropy (times ``weights``), mean over labelled pixels."""
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if weights is not None:
        per_pixel = per_pixel * weights
    labelled = labels != ignore_index
    if not labelled.any():
        return logits.sum() * 0.0
    return per_pixel[labelled].mean()
