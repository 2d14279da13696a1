"""PPC: pixel-to-prototype contrast (Du et al., CVPR 2022), on the SEAM baseline.

Why: CAM training only sees image-level labels; PPC adds a pixel-level signal by pulling each
pixel's projected feature towards the prototype of its pseudo-class and away from the other
prototypes, across the two SEAM views (so the feature of a pixel agrees with the other view's
prototypes) and within each view (with hard-example sampling).

Checked against the official code (github usr922/wseg, ``module/train.py::get_contrast_loss``,
``network/resnet38_contrast.py``); PPC is run there on SEAM (PCM, ER, ECR, both views), which the
:class:`~wsss_domains.methods.seam.Seam` base provides here. Per view, at the x0.3 view's feature
resolution (the first view's maps and features are resized to it):

* projection: ``relu(conv1x1(features))`` to 128 channels (``proj_fc``);
* pseudo-labels: the PCM maps (background first here, last in the official code) are rectified and
  min-max normalised per map (entries within 1e-5 of the minimum set to 0 before the shift, as
  official), the background channel is replaced by 0.10, and each pixel takes the arg-max of
  ``softmax(maps * [1, labels])``;
* prototypes, per channel and over the whole batch: the mean of the projected (un-normalised)
  features of the ``h*w // 16`` highest-scoring pixels, weighted by their scores, then L2-normalised;
* ``nce(f, P, y) = mean(-log softmax(f · P / 0.1)[y])`` with ``f`` the L2-normalised pixel features;
* cross-view: ``nce(f1, P2, y1)`` and ``nce(f2, P1, y2)``; cross-label: ``nce(f1, P1, y2)`` and
  ``nce(f2, P2, y1)``; intra-view: ``nce(f1, P1, y1)`` per pseudo-class on a random half of its
  pixels plus a semi-hard half (the pixels ranked ``0.6n - n/2`` to ``0.6n`` from the least similar
  to their prototype), with the positive and 10 hard negative prototypes (the 4th to 13th most
  similar) in the denominator, averaged over the classes present (classes of one pixel count but add
  nothing, as official);
* each pair is averaged and weighted by ``gamma`` = 0.1.

With fewer than 13 prototypes (the official code assumes VOC's 21) the intra-view denominator holds
each prototype once. The EPS saliency loss of the official training script is not used (no saliency maps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.methods.registry import register_method
from wsss_domains.methods.seam import Seam

PROJECTION_DIM = 128
TEMPERATURE = 0.1
GAMMA = 0.1
BACKGROUND_SCORE = 0.1
TOP_SHARE = 16  # prototypes from the h*w // 16 most confident pixels
HARD_SKIP, HARD_END = 3, 13  # intra-view negatives: the 4th to 13th most similar prototypes


class Projection(nn.Module):
    """PPC's projection head: a bias-free 1x1 convolution to 128 channels and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, features: Tensor) -> Tensor:
        return F.relu(self.conv(features))


def contrast_scores(maps: Tensor, labels: Tensor, background: float = BACKGROUND_SCORE) -> Tensor:
    """Normalised maps ``B x (K+1) x h x w`` (background first, set to ``background``), as official."""
    maps = F.relu(maps.detach())
    flat = maps.flatten(2)
    high = flat.amax(dim=-1)[..., None, None]
    low = flat.amin(dim=-1)[..., None, None]
    maps = maps.masked_fill(maps < low + 1e-5, 0.0)
    maps = (maps - low - 1e-5) / (high - low + 1e-5)
    maps[:, 0] = background
    return maps


def pseudo_labels(scores: Tensor, labels: Tensor) -> Tensor:
    """Each pixel's arg-max of ``softmax(scores * [1, labels])``, flattened over ``B x h x w``."""
    mask = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[:, :, None, None]
    return F.softmax(scores * mask, dim=1).argmax(dim=1).flatten()


def prototypes(scores: Tensor, features: Tensor, top_share: int = TOP_SHARE) -> Tensor:
    """``C x D`` L2-normalised prototypes: score-weighted mean of each channel's top pixels in the batch.

    ``scores`` is ``B x C x h x w``, ``features`` ``B x D x h x w``; each channel takes its
    ``h*w // top_share`` highest-scoring pixels over the whole batch.
    """
    _, c, h, w = scores.shape
    k = max(1, h * w // top_share)
    values, index = torch.topk(scores.transpose(0, 1).reshape(c, -1), k=k, dim=-1)
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    weighted = (values.unsqueeze(-1) * flat[index]).sum(dim=1)
    return F.normalize(weighted / values.sum(dim=1, keepdim=True).clamp_min(1e-12), dim=-1)


def prototype_nce(
    pixels: Tensor, protos: Tensor, targets: Tensor, temperature: float = TEMPERATURE
) -> Tensor:
    """``mean(-log softmax(pixels · protosᵀ / t)[targets])`` for normalised ``N x D`` pixels."""
    return F.cross_entropy(pixels @ protos.t() / temperature, targets)


def intra_view_nce(
    pixels: Tensor, protos: Tensor, targets: Tensor, temperature: float = TEMPERATURE
) -> Tensor:
    """PPC's intra-view contrast with hard prototype negatives and semi-hard pixel sampling."""
    logits = pixels @ protos.t() / temperature
    positive = logits.gather(1, targets[:, None]).squeeze(1)
    if protos.shape[0] >= HARD_END:
        with torch.no_grad():
            hard = torch.topk(logits, k=HARD_END, dim=-1)[1][:, HARD_SKIP:]
        denominator = torch.logsumexp(torch.cat([positive[:, None], logits.gather(1, hard)], dim=1), dim=1)
    else:  # too few prototypes to skip the 3 most similar: each prototype once, a plain softmax
        denominator = torch.logsumexp(logits, dim=1)
    per_pixel = denominator - positive
    similarity = (positive * temperature + 1) / 2
    total = pixels.new_zeros(())
    classes = targets.unique()
    for cls in classes:
        members = (targets == cls).nonzero().squeeze(1)
        n = members.numel()
        if n < 2:
            continue
        with torch.no_grad():
            random_half = torch.randperm(n, device=members.device)[: n // 2]
            lowest = torch.topk(similarity[members], k=int(n * 0.6), largest=False)[1]
            semi_hard = lowest[int(n * 0.6) - n // 2 :]
        total = total + per_pixel[members[torch.cat([random_half, semi_hard])]].mean()
    return total / len(classes)


def ppc_losses(
    maps: Tensor,
    scaled_maps: Tensor,
    features: Tensor,
    scaled_features: Tensor,
    labels: Tensor,
    gamma: float = GAMMA,
    background: float = BACKGROUND_SCORE,
) -> dict[str, Tensor]:
    """PPC's three contrast terms from both views' PCM maps and projected features.

    The first view's maps and features are resized (bilinear, corners aligned) to the second's size.
    """
    size = scaled_maps.shape[-2:]
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
    features = F.interpolate(features, size=size, mode="bilinear", align_corners=True)
    scores, scaled_scores = (
        contrast_scores(maps, labels, background),
        contrast_scores(scaled_maps, labels, background),
    )
    targets, scaled_targets = pseudo_labels(scores, labels), pseudo_labels(scaled_scores, labels)
    protos, scaled_protos = prototypes(scores, features), prototypes(scaled_scores, scaled_features)

    def pixels(f: Tensor) -> Tensor:
        return F.normalize(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), dim=-1)

    f1, f2 = pixels(features), pixels(scaled_features)
    return {
        "ppc_cross_view": gamma
        * (prototype_nce(f1, scaled_protos, targets) + prototype_nce(f2, protos, scaled_targets))
        / 2,
        "ppc_cross_label": gamma
        * (prototype_nce(f1, protos, scaled_targets) + prototype_nce(f2, scaled_protos, targets))
        / 2,
        "ppc_intra_view": gamma
        * (intra_view_nce(f1, protos, targets) + intra_view_nce(f2, scaled_protos, scaled_targets))
        / 2,
    }


@register_method
class Ppc(Seam):
    name = "ppc"
    description = (
        "PPC (Du et al., CVPR 2022): pixel-to-prototype contrast across and within SEAM's two views, "
        "with a projection head; pseudo-labels from the PCM-refined CAMs."
    )

    def __init__(
        self, gamma: float = GAMMA, background_score: float = BACKGROUND_SCORE, **seam_options: Any
    ) -> None:
        if gamma < 0 or not 0 <= background_score <= 1:
            raise ValueError("need gamma >= 0 and 0 <= background_score <= 1")
        super().__init__(**seam_options)
        self.options.update(gamma=gamma, background_score=background_score)
        self.gamma = float(gamma)
        self.background_score = float(background_score)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        modules = super().build_modules(model)
        modules["projection"] = Projection(model.backbone.num_features)
        return modules

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        views = self.views(model, modules, batch["image"], outputs)
        losses = self.seam_losses(views, batch["label"])
        project = modules["projection"]
        losses.update(
            ppc_losses(
                views.pcm,
                views.scaled_pcm,
                project(outputs["features"]),
                project(views.scaled_outputs["features"]),
                batch["label"],
                self.gamma,
                self.background_score,
            )
        )
        return losses
