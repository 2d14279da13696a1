"""S2C's two training signals (Kweon & Yoon, "From SAM to CAMs", CVPR 2024), as pure functions.

Follows ``models/model_s2c.py`` (``model_WSSS.update``) and ``get_se_map.py`` of
github.com/sangrockEG/S2C:

* SSC, SAM-segment contrasting: every SAM segment's mean feature is a prototype; each pixel's
  feature is pulled to its own segment's prototype and pushed from all other prototypes by a
  cross-entropy over cosine similarities. Prototypes are detached, so the features move, not the
  targets. As in the official code the softmax runs over every prototype id up to the batch's
  largest: the "no segment" prototype (mean of the unsegmented pixels) and the all-zero prototypes
  an image lacks (padding to the batch's largest segment count, cosine 0) stay in the denominator.
* CPM, CAM-based prompting: SAM masks prompted from the CAMs' peaks (or boxes, for a box-only SAM)
  become a per-pixel target for the CAMs; where masks of several classes overlap, the class with
  the higher confidence (SAM's mask logit times the class's mean CAM inside its mask) wins, and
  pixels no mask covers are background.

Where the method departs from the reference (``wsss_domains.methods.s2c``): SSC runs at
``1/ssc_stride`` of the input for memory (the reference upsamples features to full resolution;
``ssc_stride=1`` restores it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

EPS = 1e-5


def segment_index_map(masks: Tensor, scores: Tensor | None = None) -> Tensor:
    """``H x W`` int64 partition from ``N x H x W`` masks: 0 where no mask, else a segment id 1..N.

    With ``scores`` (SAM's predicted IoU), as ``get_se_map.py``: SAM's automatic mask generator
    lists masks by descending predicted IoU (its NMS order); they are painted in reverse, the
    ``i``-th painted taking id ``i + 1``, so where masks overlap the highest-scoring one wins.
    Without scores (the former rule), masks are painted largest first, so the smaller one wins,
    and mask ``n`` takes id ``n + 1``.
    """
    h, w = masks.shape[-2:]
    out = torch.zeros(h, w, dtype=torch.int64, device=masks.device)
    n = masks.shape[0]
    if n == 0:
        return out
    if scores is not None:
        if scores.shape != (n,):
            raise ValueError(f"expected {n} scores, got {tuple(scores.shape)}")
        generator_order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
        for i, k in enumerate(generator_order.flip(0).tolist()):
            out[masks[k].bool()] = i + 1
        return out
    areas = masks.reshape(n, -1).sum(dim=1)
    for i in torch.sort(areas, descending=True, stable=True).indices.tolist():
        out[masks[i].bool()] = i + 1
    return out


def ssc_loss(
    features: Tensor, segments: Tensor, temperature: float = 1.0, mask_absent: bool = False
) -> Tensor:
    """SAM-segment contrast of ``B x D x h x w`` features against ``B x H x W`` segment ids (0: none).

    The official SSC term of ``model_WSSS.update``: features resized (bilinear) to the segment maps
    and L2-normalised; prototype ``n`` of an image is the normalised mean of its (detached) features
    with id ``n`` (``torch_scatter.scatter_mean``; zero where the image has no such pixel), for
    ``n = 0 .. max id in the batch``; the loss is the cross-entropy of
    ``temperature * cos(pixel, prototype)`` over all those prototypes, averaged over the batch's
    segmented pixels (``ignore_index=0``). ``mask_absent`` (the former rule, not S2C's) drops id 0
    and the ids an image lacks from its softmax. A batch without segments gives a zero that keeps
    the graph (the official code skips its NaN).
    """
    if features.ndim != 4 or segments.ndim != 3 or features.shape[0] != segments.shape[0]:
        raise ValueError(
            f"expected BxDxhxw features and BxHxW segments, got {tuple(features.shape)}, {tuple(segments.shape)}"
        )
    ids = segments.reshape(segments.shape[0], -1).to(features.device).long()  # B x P
    if not bool((ids > 0).any()):
        return features.sum() * 0.0
    feats = F.interpolate(features, size=segments.shape[-2:], mode="bilinear", align_corners=False)
    feats = F.normalize(feats, dim=1).flatten(2)  # B x D x P
    b, d, _ = feats.shape
    n = int(ids.max()) + 1
    index = ids[:, None, :].expand(b, d, -1)
    sums = feats.new_zeros(b, d, n).scatter_add_(2, index, feats.detach())
    sizes = feats.new_zeros(b, n).scatter_add_(1, ids, torch.ones_like(ids, dtype=feats.dtype))
    protos = F.normalize(sums / sizes.clamp_min(1)[:, None, :], dim=1)  # B x D x n
    logits = temperature * torch.bmm(protos.transpose(1, 2), feats)  # B x n x P
    if mask_absent:
        absent = sizes == 0
        absent[:, 0] = True
        logits = logits.masked_fill(absent[:, :, None], float("-inf"))
    return F.cross_entropy(logits, ids, ignore_index=0)


def cpm_target(mask_logits: Tensor, cams: Tensor, background: int) -> Tensor:
    """Per-pixel CPM target ``H x W`` from per-class SAM mask logits ``K x H x W`` and CAMs ``K x H x W``.

    A class's mask is where its logit is positive (classes SAM was not prompted for carry ``-inf``);
    its confidence there is the logit times the class's mean CAM inside the mask. Each pixel takes
    the most confident class, or ``background`` where no mask covers it.
    """
    masks = mask_logits > 0
    area = masks.flatten(1).sum(dim=1)
    mean_cam = (cams * masks).flatten(1).sum(dim=1) / area.clamp_min(1)
    confidence = torch.where(
        masks, mask_logits * mean_cam[:, None, None], torch.full_like(mask_logits, float("-inf"))
    )
    target = confidence.argmax(dim=0)
    return target.masked_fill(~masks.any(dim=0), background)


def cpm_loss(cams: Tensor, labels: Tensor, targets: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy of the classifier's CAMs against CPM targets (``B x H x W``, class ``K`` = none).

    As in S2C, the scores are the raw ``B x K x h x w`` CAMs rectified, max-normalised per class,
    resized to the targets and zeroed for absent classes, plus a background score ``1 - max_k``; the
    scores lie in [0, 1], so the loss is never 0: its minimum, for CAMs exactly 1 on their target
    and 0 elsewhere, is ``log(1 + K / e)``.
    """
    scores = F.relu(cams)
    scores = scores / (scores.flatten(2).amax(dim=2)[..., None, None] + EPS)
    scores = F.interpolate(scores, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    scores = scores * labels[..., None, None].to(scores.dtype)
    background = 1.0 - scores.amax(dim=1, keepdim=True)
    return F.cross_entropy(torch.cat([scores, background], dim=1), targets.long(), ignore_index=ignore_index)


@torch.no_grad()
def multiscale_cams(model: nn.Module, images: Tensor, labels: Tensor, scales: Sequence[float]) -> Tensor:
    """S2C's prompting CAMs: ``B x K x H x W`` summed over scales, absent classes zeroed, max-normalised.

    Run with the model in eval mode (batch-norm statistics untouched), its mode restored after.
    """
    h, w = images.shape[-2:]
    was_training = model.training
    model.eval()
    try:
        total = None
        for scale in scales:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = (
                images
                if size == (h, w)
                else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            )
            maps = F.interpolate(model.cams(x), size=(h, w), mode="bilinear", align_corners=False).relu()
            total = maps if total is None else total + maps
    finally:
        model.train(was_training)
    assert total is not None
    total = total * labels[..., None, None].to(total.dtype)
    return total / (total.flatten(2).amax(dim=2)[..., None, None] + EPS)
