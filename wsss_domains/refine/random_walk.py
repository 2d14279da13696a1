"""Random-walk propagation of CAMs over a colour-affinity graph (the walk of AffinityNet / IRN).

Why: where PAR smooths within a few pixels, a random walk with hundreds of steps spreads a CAM's
peak over the whole region that is connected by high affinity, filling the parts of an object the
classifier ignored, while low affinity at boundaries stops it.

The affinity is **not learned**: it comes from the image's colours (or from features passed at
call time, e.g. a classifier stage), not from AffinityNet's trained affinity branch or IRN's
boundary map. This is therefore a colour-affinity random walk that borrows their walk and
normalisation, not AffinityNet or IRN, and its numbers must not be read as theirs.

Recipe:

* nodes are the pixels of a coarse grid (the feature map's, or the image averaged over
  ``stride x stride`` blocks; AffinityNet works at stride 8), edges join pixels closer than
  ``radius`` (``dy^2 + dx^2 < radius^2``, radius 5), plus a self-loop of affinity 1;
* affinity ``a_ij = exp(-mean_c |f_ic - f_jc|) ** beta``, the form of AffinityNet's
  ``network/resnet38_aff.py`` (L1 distance averaged over channels) applied to ``f = RGB /
  colour_sigma`` instead of learned features;
* ``T = D^-1 A`` with ``D = diag(sum_j a_ij)``: row-stochastic, so one step replaces a pixel's
  scores by the affinity-weighted average of its neighbours'. AffinityNet and IRN write this as
  ``cam @ (A D^-1)`` with class rows; for symmetric ``A`` that is ``(T cam^T)^T``;
* ``steps`` steps (AffinityNet: ``2**logt`` with logt = 8, i.e. 256; beta = 8), done as sparse
  mat-vecs rather than dense matrix squaring, so the grid can be larger;
* the result is upsampled bilinearly back to the image size and divided by its maximum over all
  classes and pixels, as IRN's ``step/make_sem_seg_labels.py`` does (``rw_up / torch.max(rw_up)``):
  one global maximum keeps a weak class weak, where a per-class maximum would inflate it;
* with ``bg_threshold`` a constant background channel of that value is prepended (channel 0), IRN's
  ``F.pad(rw_up, ..., value=sem_seg_bg_thres)``.

Differences from the official walk, none of which touch the normalisation: border pixels get all
their in-bounds neighbours (no cropped search window); IRN's ``x * (1 - edge)`` damping has no
counterpart (there is no boundary map); the division guards a zero maximum with ``1e-5``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_domains.refine.background import add_background
from wsss_domains.refine.base import as_batch

AFFINITYNET_BETA = 8.0
AFFINITYNET_STEPS = 2**8
AFFINITYNET_RADIUS = 5
AFFINITYNET_STRIDE = 8


def disc_offsets(radius: int) -> list[tuple[int, int]]:
    """Every ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2``, the centre included."""
    r = int(math.ceil(radius))
    return [
        (dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx < radius * radius
    ]


def transition_matrix(
    features: Tensor, radius: int = AFFINITYNET_RADIUS, beta: float = AFFINITYNET_BETA
) -> Tensor:
    """Sparse row-stochastic ``NxN`` transition (N = h*w, row-major) from ``Cxhxw`` features."""
    if features.dim() != 3:
        raise ValueError(f"features must be Cxhxw; got shape {tuple(features.shape)}")
    _, h, w = features.shape
    index = torch.arange(h * w, device=features.device).view(h, w)
    rows, cols, values = [], [], []
    for dy, dx in disc_offsets(radius):
        y0, y1 = max(0, -dy), min(h, h - dy)
        x0, x1 = max(0, -dx), min(w, w - dx)
        if y0 >= y1 or x0 >= x1:
            continue
        source = features[:, y0:y1, x0:x1]
        target = features[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
        distance = (source - target).abs().mean(dim=0)
        rows.append(index[y0:y1, x0:x1].reshape(-1))
        cols.append(index[y0 + dy : y1 + dy, x0 + dx : x1 + dx].reshape(-1))
        values.append(torch.exp(-beta * distance).reshape(-1))
    row, col, value = torch.cat(rows), torch.cat(cols), torch.cat(values)
    degree = torch.zeros(h * w, dtype=value.dtype, device=value.device).index_add_(0, row, value)
    # Indices are in range by construction, so the (costly) invariant check is skipped explicitly.
    return torch.sparse_coo_tensor(
        torch.stack([row, col]), value / degree[row], (h * w, h * w), check_invariants=False
    ).coalesce()


def propagate(scores: Tensor, transition: Tensor, steps: int) -> Tensor:
    """``steps`` random-walk steps on ``Kxhxw`` scores: each step ``x <- T x`` per class."""
    k, h, w = scores.shape
    x = scores.reshape(k, h * w).t()
    for _ in range(steps):
        x = torch.sparse.mm(transition, x)
    return x.t().reshape(k, h, w)


def global_max_normalize(scores: Tensor, eps: float = 1e-5) -> Tensor:
    """``BxKxHxW`` scores divided by each image's maximum over all classes and pixels (IRN)."""
    peak = scores.flatten(1).amax(dim=1).clamp_min(eps)
    return scores / peak.view(-1, 1, 1, 1)


class RandomWalkRefiner:
    """Random walk on a colour (not learned) affinity, normalised as IRN; see the module docstring."""

    name = "random-walk"

    def __init__(
        self,
        beta: float = AFFINITYNET_BETA,
        steps: int = AFFINITYNET_STEPS,
        radius: int = AFFINITYNET_RADIUS,
        stride: int = AFFINITYNET_STRIDE,
        colour_sigma: float = 0.1,
    ) -> None:
        if beta <= 0 or steps < 0 or radius < 1 or stride < 1 or colour_sigma <= 0:
            raise ValueError("need beta > 0, steps >= 0, radius >= 1, stride >= 1 and colour_sigma > 0")
        self.beta = float(beta)
        self.steps = int(steps)
        self.radius = int(radius)
        self.stride = int(stride)
        self.colour_sigma = float(colour_sigma)

    def _grid_features(self, images: Tensor, features: Tensor | None) -> Tensor:
        if features is not None:
            batched = features if features.dim() == 4 else features.unsqueeze(0)
            if batched.dim() != 4 or batched.shape[0] != images.shape[0]:
                raise ValueError(f"features {tuple(features.shape)} do not match the image batch")
            return batched.to(images.dtype)
        h, w = images.shape[-2:]
        grid = (max(1, h // self.stride), max(1, w // self.stride))
        return F.interpolate(images, size=grid, mode="area") / self.colour_sigma

    def __call__(
        self,
        image: Tensor,
        cams: Tensor,
        bg_threshold: float | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Propagated scores in [0, 1] (global maximum 1), background first with ``bg_threshold``.

        ``features`` (``Cxhxw`` or ``BxCxhxw``) replace colours as the affinity source.
        """
        images, scores, single = as_batch(image, cams)
        images = images.to(scores.dtype)
        size = scores.shape[-2:]
        grid_features = self._grid_features(images, features)
        coarse = F.interpolate(scores, size=grid_features.shape[-2:], mode="area")
        walked = torch.stack(
            [
                propagate(cam, transition_matrix(feat, self.radius, self.beta), self.steps)
                for cam, feat in zip(coarse, grid_features, strict=True)
            ]
        )
        refined = global_max_normalize(F.interpolate(walked, size=size, mode="bilinear", align_corners=False))
        if bg_threshold is not None:
            refined = add_background(refined, bg_threshold)
        return refined[0] if single else refined
