"""Fully connected (dense) CRF refinement of CAMs with ``pydensecrf2`` (Kraehenbuehl & Koltun 2011).

Why: the CRF snaps score maps to colour edges over long ranges (the bilateral kernel reaches 80 px),
which PAR's local rings cannot.

Reference: AffinityNet (Ahn & Kwak 2018, github.com/jiwoon-ahn/psa), ``infer_cls.py::_crf_with_alpha``
with ``tool/imutils.py::crf_inference`` (SEAM's ``infer_SEAM.py`` is the same code):

* the normalised CAMs of the present classes are used as they are, not softmaxed, and a background
  score ``(1 - max_k cam_k) ** alpha`` is prepended as channel 0;
* the unary is ``-log(clip(score, 1e-5, 1))`` (pydensecrf's ``unary_from_softmax``);
* pairwise: Gaussian ``sxy=3, compat=3``; bilateral ``sxy=80, srgb=13, compat=10``; 10 mean-field
  iterations. The output is the CRF marginals, background first.

One deliberate deviation, in how ``alpha`` is chosen: AffinityNet fixes it (4 and 32, SEAM 4 and
24) to carve confident regions for its affinity training, while here the CRF has to honour the
domain's effective background threshold ``t`` (``--bg-threshold``). By default ``alpha`` is
therefore ``ln t / ln(1 - t)``, the exponent at which the background score equals the top CAM
exactly when that CAM is ``t``: without pairwise terms the CRF labels a pixel as plain CAM with
threshold ``t`` does, and psa's ``alpha = 4`` is the case ``t ~ 0.276``. ``alpha=4`` restores
AffinityNet's low-alpha CRF exactly (the threshold's value is then unused).

Without ``bg_threshold`` (domains with no background) no channel is added and the CAMs alone are
the unary, as in ``crf_inference``. With a single class and no background the CRF has nothing to
decide and returns all ones. Earlier versions softmaxed the scores first (ToCo's
``infer_cam_crf_label.py``, whose pairwise terms are much weaker: ``bi_xy_std=36, bi_rgb_std=3,
bi_w=4``); mixing that with AffinityNet's pairwise terms followed neither reference.

Runs on the CPU through numpy; the result is moved back to the input's device and dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax
from torch import Tensor

from wsss_domains.refine.base import as_batch

# psa ``infer_cls.py`` ``--low_alpha`` / ``--high_alpha``.
AFFINITYNET_LOW_ALPHA = 4.0
AFFINITYNET_HIGH_ALPHA = 32.0


def image_to_uint8(image: Tensor) -> np.ndarray:
    """``3xHxW`` float in [0, 1] -> C-contiguous ``HxWx3`` uint8, the layout the bilateral kernel reads."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())


def alpha_for_threshold(threshold: float) -> float:
    """The ``alpha`` with ``(1 - t) ** alpha == t``: AffinityNet's background score then crosses the
    top CAM exactly at the threshold ``t``, so the CRF's unary decides background as plain CAM does."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"bg_threshold must lie in (0, 1) for the CRF's background score; got {threshold}")
    return math.log(threshold) / math.log(1.0 - threshold)


def background_score(cams: Tensor, alpha: float) -> Tensor:
    """AffinityNet's background score ``(1 - max_k cam_k) ** alpha`` for ``...xKxHxW`` CAMs (``...x1xHxW``).

    The maximum is clamped to [0, 1] so that a CAM slightly above 1 cannot raise a negative base to
    a fractional power (psa's normalised CAMs never exceed 1).
    """
    top = cams.amax(dim=-3, keepdim=True).clamp(0.0, 1.0)
    return (1.0 - top) ** alpha


class DenseCRFRefiner:
    """Dense CRF on raw CAM scores with AffinityNet's background score; see the module docstring."""

    name = "crf"

    def __init__(
        self,
        num_iter: int = 10,
        gaussian_sxy: float = 3.0,
        gaussian_compat: float = 3.0,
        bilateral_sxy: float = 80.0,
        bilateral_srgb: float = 13.0,
        bilateral_compat: float = 10.0,
        alpha: float | None = None,
    ) -> None:
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1; got {num_iter}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be > 0 (or None to derive it from bg_threshold); got {alpha}")
        self.num_iter = int(num_iter)
        self.gaussian_sxy = float(gaussian_sxy)
        self.gaussian_compat = float(gaussian_compat)
        self.bilateral_sxy = float(bilateral_sxy)
        self.bilateral_srgb = float(bilateral_srgb)
        self.bilateral_compat = float(bilateral_compat)
        self.alpha = None if alpha is None else float(alpha)

    def scores(self, cams: Tensor, bg_threshold: float | None) -> Tensor:
        """The CRF's per-label scores: the CAMs, background score first when ``bg_threshold`` is given."""
        if bg_threshold is None:
            return cams
        alpha = self.alpha if self.alpha is not None else alpha_for_threshold(bg_threshold)
        return torch.cat([background_score(cams, alpha), cams], dim=-3)

    def marginals(self, image: Tensor, scores: Tensor) -> Tensor:
        """Mean-field marginals ``LxHxW`` for one ``3xHxW`` image and per-label scores ``LxHxW``."""
        n_labels, h, w = scores.shape
        crf = dcrf.DenseCRF2D(w, h, n_labels)
        unary = unary_from_softmax(scores.detach().cpu().numpy().astype(np.float32))
        crf.setUnaryEnergy(np.ascontiguousarray(unary))
        crf.addPairwiseGaussian(sxy=self.gaussian_sxy, compat=self.gaussian_compat)
        crf.addPairwiseBilateral(
            sxy=self.bilateral_sxy,
            srgb=self.bilateral_srgb,
            rgbim=image_to_uint8(image),
            compat=self.bilateral_compat,
        )
        q = np.asarray(crf.inference(self.num_iter), dtype=np.float32).reshape(n_labels, h, w)
        return torch.from_numpy(q).to(device=scores.device, dtype=scores.dtype)

    def __call__(self, image: Tensor, cams: Tensor, bg_threshold: float | None = None) -> Tensor:
        """Marginals for ``3xHxW``/``KxHxW`` (or batched) inputs: ``(K+1)`` channels with background."""
        images, cams, single = as_batch(image, cams)
        scores = self.scores(cams, bg_threshold)
        refined = torch.stack([self.marginals(img, s) for img, s in zip(images, scores, strict=True)])
        return refined[0] if single else refined
