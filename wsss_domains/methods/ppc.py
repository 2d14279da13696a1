"""PPC: pixel-to-prototype contrast (Du et al., CVPR 2022), on the SEAM baseline.

Why: CAM training only sees image-level labels; PPC adds a pixel-level signal by pulling each
pixel's projected feature towards the prototype of its pseudo-class and away from the other
prototypes, across the two SEAM views (so the feature of a pixel agrees with the other view's
prototypes) and within each view (with hard-example sampling).

Reproduces the saliency-free variant, checked line by line against its official code (github
usr922/wseg: ``contrast_train.py`` lines 122-395, ``network/resnet38_contrast.py``). PPC runs there
on SEAM (PCM, ER, ECR, both views), which the :class:`~wsss_domains.methods.seam.Seam` base provides
here; the official defaults are this module's defaults:

* second view: the batch resized to a fixed 128x128 (bilinear, corners aligned; ``img2``), used by
  the SEAM terms as well (instead of SEAM's x0.3 copy; lines 130-134);
* contrast grid: 16x16 (``128 // 8``); the first view's PCM maps and projected features are resized
  to it (bilinear, corners aligned), the second view's are used as they are (lines 179-181);
* projection: ``relu(conv1x1(features))`` to 128 channels, bias-free, Xavier-uniform (``fc_proj``)
  on the backbone's last feature map (``conv6``);
* pseudo-labels from the PCM maps at feature resolution (``cam_rv_down``, background first as
  official): rectified and min-max normalised per map (entries within 1e-5 of the minimum set to 0
  before the shift), the background channel replaced by ``bg_threshold`` = 0.20, and each pixel
  takes the arg-max of ``softmax(maps * [1, labels])`` (line 51, lines 186-197);
* prototypes, per channel and over the whole batch: the mean of the projected (un-normalised,
  detached) features of the ``h*w // 8`` highest-scoring pixels, weighted by their scores, then
  L2-normalised (lines 202-209);
* ``nce(f, P, y) = mean(-log softmax(f · P / 0.1)[y])`` with ``f`` the L2-normalised pixel features;
* cross-view (``loss_cross_nce``): ``nce(f1, P2, y1)`` and ``nce(f2, P1, y2)``; cross-label
  (``loss_cross_nce2``): ``nce(f1, P1, y2)`` and ``nce(f2, P2, y1)``; intra-view
  (``loss_intra_nce``): ``nce(f1, P1, y1)`` per pseudo-class on a random half of its pixels plus a
  semi-hard half (the pixels ranked ``0.6n - n/2`` to ``0.6n`` from the least similar to their
  prototype), with the positive and 10 hard negative prototypes (the 4th to 13th most similar) in
  the denominator, averaged over the classes present (classes of one pixel count but add nothing,
  as official);
* each pair is averaged and weighted by ``gamma`` = 0.1 (lines 269, 281, 389);
* inference (``contrast_infer.py``, lines 75-80): the summed multi-scale, flipped PCM maps min-max
  normalised per class, the same lines as SEAM's ``infer_SEAM.py``.

The former defaults of this module, background score 0.10 and prototypes from ``h*w // 16``
pixels, belong to the EPS+saliency variant of PPC; they stay reachable as the options
``background_score=0.1, top_share=16``. ``second_view_size=None`` restores SEAM's x``scale_factor``
second view and ``contrast_size=None`` contrasts at that view's feature resolution.

Deliberate deviations (other backbones and label sets, and the shared classifier):

* the official ResNet-38 has output stride 8, so its 128x128 view already has 16x16 features; at
  another stride (16 by default here) the second view's maps and features are resized to the 16x16
  grid too (bilinear, corners aligned), so every prototype still pools ``16*16 // 8`` = 32 pixels;
* the official network applies ``Dropout2d(0.5)`` (``dropout7``) to ``conv6`` before both the
  classifier and the projection; the classifier here has no such dropout (nor has the SEAM base);
* with fewer than 13 prototypes (the official code assumes VOC's 21) the intra-view denominator
  holds each prototype once; the random half uses ``torch.randperm`` where the official code uses
  ``random.sample`` (same distribution).
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
BACKGROUND_SCORE = 0.2  # contrast_train.py --bg_threshold
TOP_SHARE = 8  # prototypes from the h*w // 8 most confident pixels
SECOND_VIEW_SIZE = 128  # img2: the batch resized to 128x128
CONTRAST_SIZE = 128 // 8  # both views' maps and features meet on a 16x16 grid
HARD_SKIP, HARD_END = 3, 13  # intra-view negatives: the 4th to 13th most similar prototypes
# The EPS+saliency variant's constants (this module's former defaults), for ``background_score``
# and ``top_share``.
EPS_VARIANT_BACKGROUND_SCORE = 0.1
EPS_VARIANT_TOP_SHARE = 16


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
    pixels: Tensor,
    protos: Tensor,
    targets: Tensor,
    temperature: float = TEMPERATURE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PPC's intra-view contrast with hard prototype negatives and semi-hard pixel sampling.

    The random half of each class is ``torch.randperm(n, generator=generator)[: n // 2]``, drawn
    class by class in ascending class order.
    """
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
            device = members.device if generator is None else generator.device
            random_half = torch.randperm(n, generator=generator, device=device)[: n // 2].to(members.device)
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
    top_share: int = TOP_SHARE,
    contrast_size: int | None = CONTRAST_SIZE,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """PPC's three contrast terms from both views' PCM maps and projected features.

    Maps and features of a view whose feature resolution is not ``contrast_size`` square are resized
    (bilinear, corners aligned) to it; with ``contrast_size=None``, the first view is resized to the
    second's resolution. ``generator`` drives the intra-view random halves.
    """
    size = scaled_maps.shape[-2:] if contrast_size is None else (contrast_size, contrast_size)

    def to_grid(x: Tensor) -> Tensor:
        if x.shape[-2:] == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    maps, features = to_grid(maps), to_grid(features)
    scaled_maps, scaled_features = to_grid(scaled_maps), to_grid(scaled_features)
    scores, scaled_scores = (
        contrast_scores(maps, labels, background),
        contrast_scores(scaled_maps, labels, background),
    )
    targets, scaled_targets = pseudo_labels(scores, labels), pseudo_labels(scaled_scores, labels)
    protos = prototypes(scores, features, top_share)
    scaled_protos = prototypes(scaled_scores, scaled_features, top_share)

    def pixels(f: Tensor) -> Tensor:
        return F.normalize(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), dim=-1)

    f1, f2 = pixels(features), pixels(scaled_features)
    intra = intra_view_nce(f1, protos, targets, generator=generator)
    scaled_intra = intra_view_nce(f2, scaled_protos, scaled_targets, generator=generator)
    return {
        "ppc_cross_view": gamma
        * (prototype_nce(f1, scaled_protos, targets) + prototype_nce(f2, protos, scaled_targets))
        / 2,
        "ppc_cross_label": gamma
        * (prototype_nce(f1, protos, scaled_targets) + prototype_nce(f2, scaled_protos, targets))
        / 2,
        "ppc_intra_view": gamma * (intra + scaled_intra) / 2,
    }


@register_method
class Ppc(Seam):
    deviations = (
        "at output stride 16 the 128x128 view's maps are resized to the official 16x16 contrast grid; no"
        " Dropout2d(0.5) before the classifier and projection; fewer than 13 prototypes: each once in the"
        " intra-view denominator"
    )
    name = "ppc"
    # contrast_infer.py: (sum_cam - min - 1e-5) / (max - min + 1e-5), as infer_SEAM.py (inherited).
    description = (
        "PPC (Du et al., CVPR 2022), saliency-free variant: pixel-to-prototype contrast across and "
        "within SEAM's two views (the second a fixed 128x128 copy), with a projection head; "
        "pseudo-labels from the PCM-refined CAMs."
    )

    def __init__(
        self,
        gamma: float = GAMMA,
        background_score: float = BACKGROUND_SCORE,
        top_share: int = TOP_SHARE,
        second_view_size: int | None = SECOND_VIEW_SIZE,
        contrast_size: int | None = CONTRAST_SIZE,
        **seam_options: Any,
    ) -> None:
        if gamma < 0 or not 0 <= background_score <= 1:
            raise ValueError("need gamma >= 0 and 0 <= background_score <= 1")
        if int(top_share) != top_share or top_share < 1:
            raise ValueError(f"top_share must be a positive integer, got {top_share!r}")
        for key, value in (("second_view_size", second_view_size), ("contrast_size", contrast_size)):
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
        super().__init__(**seam_options)
        self.options.update(
            gamma=gamma,
            background_score=background_score,
            top_share=top_share,
            second_view_size=second_view_size,
            contrast_size=contrast_size,
        )
        self.gamma = float(gamma)
        self.background_score = float(background_score)
        self.top_share = int(top_share)
        self.second_view_size = None if second_view_size is None else int(second_view_size)
        self.contrast_size = None if contrast_size is None else int(contrast_size)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        modules = super().build_modules(model)
        modules["projection"] = Projection(model.backbone.num_features)
        return modules

    def second_view(self, image: Tensor) -> Tensor:
        """The batch resized to ``second_view_size`` square (official), else SEAM's rescaled view."""
        if self.second_view_size is None:
            return super().second_view(image)
        size = (self.second_view_size, self.second_view_size)
        return F.interpolate(image, size=size, mode="bilinear", align_corners=True)

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
                self.top_share,
                self.contrast_size,
            )
        )
        return losses
