"""CPN: complementary patch network (Zhang et al., ICCV 2021).

Why: a CAM covers only the most discriminative part of an object. CPN hides a random half of the
image's patches in one copy and the other half in a second copy (a complementary patch pair). Each
copy's CAM, weighted by the share of the image it shows, should add up to the CAM of the whole
image: pulling the whole image's CAM towards that sum (and the sum's refined maps towards each
other) spreads the CAM over the less discriminative parts each copy is forced to rely on. CPN is
built on SEAM's network (the PCM and its training losses) and adds a pixel-region correlation
module (PRCM) to the refined maps. Pseudo-labels use the refined maps.

Checked against Ferenas/CPN (``train_cpn.py``, ``network/resnet38_CPN.py``, ``network/da_atten.py``,
``tool/imutils.py``, ``voc12/data.py``, ``infer_cam.py``):

* complementary pairs (``tool/imutils.py``), drawn per image, on the normalised image (hidden
  pixels become 0, the mean colour): ``hide_patch`` (grid) picks one grid size at random among
  ``grid_sizes`` and hides each cell (rows first, edge cells clipped) when ``random() <= hide_prob``;
  the first copy is ``image * sign``, the second ``image * (1 - sign)``, and the first's weight
  ``ctri`` is the share of *cells* it shows (the second's ``1 - ctri``). ``hide_patch_ss``
  (superpixel) cuts the image into SLIC superpixels (``n_segments=300, compactness=10,
  start_label=1`` on the normalised image) and hides the superpixels whose ids are among
  ``floor((n + 1) * 0.5)`` draws of ``randint(0, n + 1)`` (with replacement); ``ctri`` is the share
  of *pixels* shown (:func:`grid_sign`, :func:`superpixel_sign`);
* network (``resnet38_CPN.py: Net.forward``): SEAM's PCM seeds (:func:`seam.pcm_seeds`) and PCM
  (``f8_3``/``f8_4``/``f9``, :class:`seam.PixelCorrelationModule`), plus the PRCM:
  ``SpatialGather_Module`` gathers ``f = [image↓, relu(f8_3), relu(f8_4)]`` into one vector per
  channel of the seeds (softmax of the seeds over the pixels), ``f10`` (1x1, 195→192, xavier gain
  4) embeds them, the keys are ``relu(f10(·))`` *reshaped* (not transposed) to ``(K+1) x 192``, as
  the official ``view(n, 21, -1)`` does, and the PRCM map is ``softmax((K+1)^-½ · key · relu(f9(f)))``
  over the pixels; the refined maps are ``PCM(seeds) + PRCM · seeds`` (:class:`RegionCorrelationModule`);
  CAMs and refined maps are upsampled to the input (bilinear, aligned corners) before every loss,
  and each view is classified by the global average of its upsampled CAMs (:func:`seam.forward_view`);
* losses (``train_cpn.py``), with ``C_v = w_v · max_norm(cam_v) · y``, ``R_v = w_v ·
  max_norm(rv_v) · y`` (``w`` = 1, ``ctri``, ``1 - ctri`` for the image and its two copies, ``y``
  the labels, foreground channels): classification ``(cls + cls1 + cls2) / 3`` (the engine's loss
  has weight 1/3) plus ``(rvmin + rvmin1 + rvmin2) / 3`` (SEAM's :func:`seam.adaptive_min_pooling_loss`
  on ``rv_v · y``); ``tcp = mean|C_1.detach() + C_2.detach() - C_0|`` plus ``tcp_rv = mean|R_0 -
  R_1 - R_2|`` (no detach); CPCR: with the background channel ``1 - max`` prepended to every map,
  ``top20%mean|max_onehot(C_0 - C_1).detach() - R_2| + top20%mean|max_onehot(C_0 - C_2).detach() -
  R_1|``, where ``max_onehot`` keeps each pixel's maximum over *all* channels, background included
  (CPN's ``tool/imutils.py``, unlike SEAM's foreground-only one); every weight is 1, no schedule;
* inference (``infer_cam.py``): the refined maps' foreground channels, multi-scale and flipped,
  summed and min-max normalised per class (:class:`seam.PcmCamExtractor`, as SEAM's).

``tests/methods/test_cpn.py`` compares the masks, the refined maps and the losses (values and
gradients) with a transcription of the official code. Deviations (also in :attr:`Cpn.deviations`):
the default pairing is ``grid`` because the official default, superpixels, needs scikit-image,
which is not a dependency (``strategy="superpixel"`` works when it is installed); the grid sizes
are fractions of the image's longer side (official: 224 and 448 pixels of a 448 crop, so the default
``(0.5, 1.0)``), and ``hide_prob`` also sets the superpixel draws (official: 0.5 for both); the
PRCM's scale is ``(K+1)^-½`` (official: the literal 21 of VOC); at inference, SEAM's deviations
(one upsampling step; no minimum shift over a raster normalised across windows), and the maps are
not halved (``infer_cam.py`` halves them for its background search; the domain's background
threshold plays that part). The official code feeds CPN's maps
to IRN for the final pseudo-labels; that second stage is not part of this method (chain it).

Adaptation to timm CNNs as for SEAM: ResNet-38's ``conv4``/``conv5`` are the backbone's third- and
second-last ``feature_info`` stages, and there is no ``fc8`` background channel (the official one
receives no gradient: it is overwritten or sliced away before every loss).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.seam import (
    PCM_STAGES,
    PcmCamExtractor,
    PixelCorrelationModule,
    adaptive_min_pooling_loss,
    forward_view,
    max_norm,
    pcm_seeds,
    pixel_correlation,
    top_mean,
    with_background,
)
from wsss_domains.models.stages import stage_channels

GRID_SIZES = (0.5, 1.0)  # official: 224 and 448 pixels on 448 crops
HIDE_PROB = 0.5
SUPERPIXELS = 300
SLIC_COMPACTNESS = 10.0
OHEM_RATIO = 0.2
KEY_CHANNELS = 192


def grid_sign(
    height: int, width: int, grid_sizes: Sequence[int], hide_prob: float, rng: random.Random
) -> tuple[Tensor, float]:
    """``tool/imutils.py: hide_patch``: an ``H x W`` 0/1 map (0: hidden in the first copy) and ``ctri``.

    One grid size (in pixels) is drawn from ``grid_sizes``; cells run over rows first, then columns,
    edge cells clipped; each is hidden when ``rng.random() <= hide_prob``. ``ctri`` is the share of
    cells shown, as in the official code (not of pixels).
    """
    grid = grid_sizes[rng.randint(0, len(grid_sizes) - 1)]
    sign = torch.ones(height, width)
    shown = hidden = 0
    for y in range(0, height, grid):
        for x in range(0, width, grid):
            if rng.random() <= hide_prob:
                sign[y : y + grid, x : x + grid] = 0
                hidden += 1
            else:
                shown += 1
    return sign, shown / (shown + hidden)


def superpixel_sign(
    segments: np.ndarray, hide_prob: float, rng: np.random.RandomState
) -> tuple[Tensor, float]:
    """``tool/imutils.py: hide_patch_ss`` after SLIC: hide the superpixels drawn, with replacement.

    ``segments`` holds superpixel ids from 1 (``start_label=1``); ``floor((max + 1) * hide_prob)``
    ids are drawn from ``0..max`` (0 names no superpixel, as in the official code). ``ctri`` is
    the share of pixels shown.
    """
    top = int(segments.max()) + 1
    drawn = rng.randint(0, top, int(np.floor(top * hide_prob)))
    hidden = np.isin(segments, drawn)
    sign = torch.from_numpy((~hidden).astype(np.float32))
    return sign, float(1.0 - hidden.mean())


def slic_segments(image: Tensor, superpixels: int = SUPERPIXELS) -> np.ndarray:
    """SLIC superpixels of a normalised ``3 x H x W`` image, with ``hide_patch_ss``'s settings."""
    try:
        from skimage.segmentation import slic
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "cpn's strategy='superpixel' needs scikit-image (pip install scikit-image)"
        ) from error
    pixels = image.detach().float().permute(1, 2, 0).cpu().numpy()
    return slic(pixels, compactness=SLIC_COMPACTNESS, n_segments=superpixels, start_label=1)


def max_onehot_all(maps: Tensor) -> Tensor:
    """CPN's ``max_onehot``: keep each pixel's maximum over all channels (background too), zero the rest."""
    return maps.masked_fill(maps != maps.amax(dim=1, keepdim=True), 0)


def spatial_gather(features: Tensor, seeds: Tensor) -> Tensor:
    """``da_atten.py: SpatialGather_Module``: ``B x D x C x 1``, features averaged under each seed channel's
    softmax over the pixels."""
    b, d, h, w = features.shape
    if seeds.shape[-2:] != (h, w):
        seeds = F.interpolate(seeds, size=(h, w), mode="bilinear", align_corners=True)
    weights = F.softmax(seeds.flatten(2), dim=2)  # B x C x hw
    context = weights @ features.flatten(2).transpose(1, 2)  # B x C x D
    return context.permute(0, 2, 1).unsqueeze(3)


class RegionCorrelationModule(PixelCorrelationModule):
    """SEAM's PCM plus CPN's pixel-region correlation (``f10``); same call as the PCM, so
    :class:`seam.PcmCamExtractor` serves it."""

    def __init__(self, low_channels: int, mid_channels: int) -> None:
        super().__init__(low_channels, mid_channels)
        self.key = nn.Conv2d(64 + 128 + 3, KEY_CHANNELS, kernel_size=1, bias=False)
        nn.init.xavier_uniform_(self.key.weight, gain=4)

    def region_correlation(self, seeds: Tensor, f: Tensor, embedded: Tensor) -> Tensor:
        """``Net.PRCM(spatial_gather(f, seeds), f)``: ``B x (K+1) x h x w``, a softmax over the pixels."""
        b, channels = seeds.shape[:2]
        h, w = f.shape[-2:]
        # The official view(n, 21, -1) of a n x 192 x 21 x 1 tensor: a reshape, not a transpose.
        key = F.relu(self.key(spatial_gather(f, seeds))).reshape(b, channels, -1)
        sim = channels**-0.5 * (key @ F.relu(embedded).flatten(2))
        return F.softmax(sim, dim=-1).view(b, channels, h, w)

    def forward(self, cams: Tensor, image: Tensor, low: Tensor, mid: Tensor) -> Tensor:
        """Refined maps ``B x (K+1) x h x w`` (background first) from raw CAMs ``B x K x h x w``."""
        size = (cams.shape[-2], cams.shape[-1])
        seeds = pcm_seeds(cams)
        f = self.inputs(image, low, mid, size)
        embedded = self.embed(f)
        return pixel_correlation(seeds, embedded) + self.region_correlation(seeds, f, embedded) * seeds


def cpn_losses(
    cams: Sequence[Tensor], refined: Sequence[Tensor], ctri: Tensor, labels: Tensor, ohem_ratio: float
) -> dict[str, Tensor]:
    """``train_cpn.py``'s CPN terms for the image and its two copies (in that order).

    ``cams``: raw foreground CAMs ``B x K x H x W``, ``refined``: refined maps ``B x (K+1) x H x W``
    (background first), all at the input size; ``ctri``: ``B`` shares shown by the first copy;
    ``labels``: ``B x K``. ``rvmin`` is the mean over the three views; the copies' classification
    terms are added in :meth:`Cpn.training_losses`.
    """
    mask = labels[:, :, None, None]
    rate = ctri.to(labels.dtype)[:, None, None, None]
    weights = (torch.ones_like(rate), rate, 1 - rate)
    c = [w * max_norm(cam) * mask for w, cam in zip(weights, cams, strict=True)]
    r = [w * max_norm(rv[:, 1:]) * mask for w, rv in zip(weights, refined, strict=True)]
    rvmin = sum(adaptive_min_pooling_loss(rv[:, 1:] * mask) for rv in refined) / 3
    tcp = (c[1].detach() + c[2].detach() - c[0]).abs().mean()
    tcp_rv = (r[0] - r[1] - r[2]).abs().mean()
    cb = [with_background(x).detach() for x in c]
    rb = [with_background(x) for x in r]
    cpcr = top_mean((max_onehot_all(cb[0] - cb[1]) - rb[2]).abs(), ohem_ratio) + top_mean(
        (max_onehot_all(cb[0] - cb[2]) - rb[1]).abs(), ohem_ratio
    )
    return {"rvmin": rvmin, "tcp": tcp, "tcp_rv": tcp_rv, "cpcr": cpcr}


@register_method
class Cpn(Method):
    name = "cpn"
    description = (
        "CPN (Zhang et al., ICCV 2021): the CAM of an image is pulled towards the sum of the CAMs of a "
        "complementary pair of patch-hidden copies; SEAM's PCM plus a pixel-region correlation module."
    )
    deviations = (
        "Pairs: default grid (official default: SLIC superpixels, strategy='superpixel', which needs "
        "scikit-image, not a dependency); grid sizes are fractions of the image's longer side (official "
        "224/448 px of a 448 crop); hide_prob also sets the superpixel draws. PRCM scale (K+1)^-1/2 "
        "(official: 21, VOC). Inference as SEAM here (min-max per class, one upsampling step; maps not halved "
        "as infer_cam.py does for its background search). The official IRN "
        "second stage is not part of the method. Backbone: a timm CNN's third- and second-last stages "
        "stand for ResNet-38's conv4/conv5; no fc8 background channel (it receives no gradient)."
    )
    classification_weight = 1 / 3

    def __init__(
        self,
        strategy: Literal["grid", "superpixel"] = "grid",
        grid_sizes: Sequence[float] = GRID_SIZES,
        hide_prob: float = HIDE_PROB,
        superpixels: int = SUPERPIXELS,
        ohem_ratio: float = OHEM_RATIO,
        pcm_stages: Sequence[int] = PCM_STAGES,
    ) -> None:
        if strategy not in ("grid", "superpixel"):
            raise ValueError(f"cpn: strategy must be 'grid' or 'superpixel', not {strategy!r}")
        if not grid_sizes or not all(0 < s <= 1 for s in grid_sizes):
            raise ValueError("cpn: grid_sizes are fractions of the image side in (0, 1]")
        if not 0 <= hide_prob <= 1 or not 0 < ohem_ratio <= 1 or superpixels < 1 or len(pcm_stages) != 2:
            raise ValueError(
                "cpn: need 0 <= hide_prob <= 1, 0 < ohem_ratio <= 1, superpixels >= 1, two pcm_stages"
            )
        super().__init__(
            strategy=strategy,
            grid_sizes=list(grid_sizes),
            hide_prob=hide_prob,
            superpixels=superpixels,
            ohem_ratio=ohem_ratio,
            pcm_stages=list(pcm_stages),
        )
        self.strategy = strategy
        self.grid_sizes = tuple(float(s) for s in grid_sizes)
        self.hide_prob = float(hide_prob)
        self.superpixels = int(superpixels)
        self.ohem_ratio = float(ohem_ratio)
        self.pcm_stages = tuple(int(i) for i in pcm_stages)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        low, mid = stage_channels(model.backbone, self.pcm_stages)
        return nn.ModuleDict({"pcm": RegionCorrelationModule(low, mid)})

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return forward_view(model, batch["image"], self.pcm_stages)

    def signs(self, images: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Per image, the 0/1 map of the first copy (``B x 1 x H x W``) and the share it shows (``B``)."""
        h, w = images.shape[-2:]
        rng, np_rng = random.Random(seed), np.random.RandomState(seed % 2**32)
        sizes = [max(1, round(s * max(h, w))) for s in self.grid_sizes]
        signs, shares = [], []
        for image in images:
            if self.strategy == "grid":
                sign, share = grid_sign(h, w, sizes, self.hide_prob, rng)
            else:
                sign, share = superpixel_sign(slic_segments(image, self.superpixels), self.hide_prob, np_rng)
            signs.append(sign)
            shares.append(share)
        return torch.stack(signs)[:, None].to(images), torch.tensor(shares, device=images.device)

    def view(
        self, model: nn.Module, modules: nn.ModuleDict, image: Tensor, outputs: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """One view's CAMs and refined maps, both upsampled to the input (aligned corners)."""
        refined = modules["pcm"](outputs["cams"], image, outputs["stage0"], outputs["stage1"])

        def up(maps: Tensor) -> Tensor:
            return F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=True)

        return up(outputs["cams"]), up(refined)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        # The official pairs come from Python's and NumPy's global generators in the data loader; here
        # one seed per step from torch's (seeded by the run), so a seeded run draws the same pairs.
        sign, ctri = self.signs(image, int(torch.randint(0, 2**31 - 1, ()).item()))
        copies = (image * sign, image * (1 - sign))
        copy_outputs = [forward_view(model, copy, self.pcm_stages) for copy in copies]
        views = [self.view(model, modules, image, outputs)] + [
            self.view(model, modules, copy, out) for copy, out in zip(copies, copy_outputs, strict=True)
        ]
        losses = cpn_losses([v[0] for v in views], [v[1] for v in views], ctri, labels, self.ohem_ratio)
        cls_copies = (
            sum(F.binary_cross_entropy_with_logits(out["logits"], labels) for out in copy_outputs) / 3
        )
        return {"cls_copies": cls_copies, **losses}

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return PcmCamExtractor(model, modules["pcm"], self.pcm_stages, subtract_minimum=True, **kwargs)
