"""Fully connected (dense) CRF refinement of CAMs with ``pydensecrf2`` (Kraehenbuehl & Koltun 2011).

Why: the CRF snaps score maps to colour edges over long ranges (the bilateral kernel reaches 80 px),
which PAR's local rings cannot; it is the classic post-processing of AffinityNet/IRN and ToCo.

Parameters are the standard ones from the pydensecrf README and AffinityNet's
``tool/imutils.py::crf_inference``: smoothness kernel ``sxy=3, compat=3``; appearance kernel
``sxy=80, srgb=13, compat=10``; 10 mean-field iterations. IRN's label-CRF uses ``sxy=50, srgb=5`` for
the appearance kernel instead; both are a constructor argument away. ToCo tunes its own
(e.g. ``bi_xy_std=36, bi_rgb_std=3, bi_w=4`` for CAM labels).

Scores become a distribution before the CRF as in ToCo's ``infer_cam_crf_label.py``: with
``bg_threshold`` a constant background channel is prepended, then a softmax over channels; without
one the softmax runs over the foreground channels alone (so the unary energy is ``-cam`` up to a
per-pixel constant). The output is the CRF marginals, ``(K+1)xHxW`` or ``KxHxW``, summing to 1 per
pixel. With a single class and no background the CRF has nothing to decide and returns all ones.

Runs on the CPU through numpy; the result is moved back to the input's device and dtype.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax
from torch import Tensor

from wsss_domains.refine.background import add_background
from wsss_domains.refine.base import as_batch


def image_to_uint8(image: Tensor) -> np.ndarray:
    """``3xHxW`` float in [0, 1] -> C-contiguous ``HxWx3`` uint8, the layout the bilateral kernel reads."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())


class DenseCRFRefiner:
    """Dense CRF over softmax-normalised CAMs; see the module docstring for the recipe."""

    name = "crf"

    def __init__(
        self,
        num_iter: int = 10,
        gaussian_sxy: float = 3.0,
        gaussian_compat: float = 3.0,
        bilateral_sxy: float = 80.0,
        bilateral_srgb: float = 13.0,
        bilateral_compat: float = 10.0,
    ) -> None:
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1; got {num_iter}")
        self.num_iter = int(num_iter)
        self.gaussian_sxy = float(gaussian_sxy)
        self.gaussian_compat = float(gaussian_compat)
        self.bilateral_sxy = float(bilateral_sxy)
        self.bilateral_srgb = float(bilateral_srgb)
        self.bilateral_compat = float(bilateral_compat)

    def marginals(self, image: Tensor, probs: Tensor) -> Tensor:
        """Mean-field marginals ``LxHxW`` for one ``3xHxW`` image and per-pixel distributions ``LxHxW``."""
        n_labels, h, w = probs.shape
        crf = dcrf.DenseCRF2D(w, h, n_labels)
        unary = unary_from_softmax(probs.detach().cpu().numpy().astype(np.float32))
        crf.setUnaryEnergy(np.ascontiguousarray(unary))
        crf.addPairwiseGaussian(sxy=self.gaussian_sxy, compat=self.gaussian_compat)
        crf.addPairwiseBilateral(
            sxy=self.bilateral_sxy,
            srgb=self.bilateral_srgb,
            rgbim=image_to_uint8(image),
            compat=self.bilateral_compat,
        )
        q = np.asarray(crf.inference(self.num_iter), dtype=np.float32).reshape(n_labels, h, w)
        return torch.from_numpy(q).to(device=probs.device, dtype=probs.dtype)

    def __call__(self, image: Tensor, cams: Tensor, bg_threshold: float | None = None) -> Tensor:
        """Refined marginals for ``3xHxW``/``KxHxW`` (or batched) inputs."""
        images, scores, single = as_batch(image, cams)
        if bg_threshold is not None:
            scores = add_background(scores, bg_threshold)
        probs = scores.softmax(dim=1)
        refined = torch.stack([self.marginals(img, p) for img, p in zip(images, probs, strict=True)])
        return refined[0] if single else refined
