"""PAR: pixel-adaptive refinement of CAMs by local RGB affinity (ToCo / AFA, Ru et al.).

Why: CAMs are blurry at object boundaries because they come from a stride-16 feature map; PAR
re-distributes each pixel's scores from neighbours of similar colour, which pulls leakage back
behind colour edges at the cost of a few convolutions, with no learned weights.

Formula, checked against ToCo's ``model/PAR.py`` (PAR class, as used in
``scripts/dist_train_voc_seg_neg.py``: ``PAR(num_iter=10, dilations=[1, 2, 4, 8, 12, 24])``):

* neighbours ``j`` of pixel ``i``: the 8 pixels of the 3x3 ring at each dilation ``d``
  (the centre is *not* a neighbour), image borders replicate-padded; N = 8 x len(dilations);
* per RGB channel ``c``, ``sigma_ic`` = unbiased std of ``I_jc`` over the N neighbours;
* colour logit ``k_ij = mean_c( -( |I_ic - I_jc| / ((sigma_ic + 1e-8) * w1) )^2 )``;
* position logit ``p_j = -( dist_j / ((std_j dist_j + 1e-8) * w1) )^2`` with
  ``dist_j = d`` (edge neighbour) or ``d*sqrt(2)`` (corner neighbour), the same for every pixel;
* affinity ``a_ij = softmax_j(k_ij) + w2 * softmax_j(p_j)`` with w1 = 0.3, w2 = 0.01;
* 10 times: ``m_i <- sum_j a_ij m_j`` (independently for every channel).

The positional softmax is *added* (weighted by w2), so each step scales scores by ``1 + w2`` and 10
steps by about 1.105, uniformly; this is kept as in the official code (argmax is unaffected).

Background (``bg_threshold`` given), as ToCo's ``refine_cams_with_bkg_v2``: a constant channel of
value ``bg_threshold`` is prepended, all channels pass through a softmax over classes, and PAR refines
the resulting probabilities; channel 0 of the output is background. ToCo runs this at half
resolution (``down_scale=2``) during training; ``downscale`` reproduces that, default 1 (full size).
Without a background the raw CAMs are propagated, no softmax (a softmax over foreground channels
alone would erase their absolute confidence, e.g. a single present class would become all ones).

Neighbours are gathered by slicing the replicate-padded tensor (equivalent to the official
convolution with one-hot 3x3 kernels, cheaper), so it is plain torch: batched, CPU or CUDA,
differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_domains.refine.background import add_background
from wsss_domains.refine.base import as_batch

TOCO_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
TOCO_NUM_ITER = 10
TOCO_W1 = 0.3
TOCO_W2 = 0.01

# (dy, dx) of the 3x3 ring, row-major without the centre: the order of ToCo's one-hot kernels.
RING_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1), (0, 1),
    (1, -1), (1, 0), (1, 1),
)  # fmt: skip


def dilated_neighbours(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """``BxCxHxW`` -> ``BxCxNxHxW``: the 8 ring neighbours at every dilation, borders replicated."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in RING_OFFSETS:
            top, left = d + dy * d, d + dx * d
            out.append(padded[..., top : top + h, left : left + w])
    return torch.stack(out, dim=2)


def neighbour_distances(dilations: Sequence[int]) -> Tensor:
    """Euclidean distance from the centre to each of the N neighbours, in ``dilated_neighbours`` order."""
    return torch.tensor(
        [d * math.sqrt(dy * dy + dx * dx) for d in dilations for dy, dx in RING_OFFSETS],
        dtype=torch.float64,
    )


def par_affinity(
    image: Tensor,
    dilations: Sequence[int] = TOCO_DILATIONS,
    w1: float = TOCO_W1,
    w2: float = TOCO_W2,
) -> Tensor:
    """Affinity ``Bx1xNxHxW`` from ``Bx3xHxW`` RGB: each pixel's weights over its N neighbours."""
    neighbours = dilated_neighbours(image, dilations)
    diff = (neighbours - image.unsqueeze(2)).abs()
    sigma = neighbours.std(dim=2, keepdim=True)
    colour = (-((diff / (sigma + 1e-8) / w1) ** 2)).mean(dim=1, keepdim=True)
    dist = neighbour_distances(dilations)
    position = -((dist / (dist.std() + 1e-8) / w1) ** 2)
    position = position.softmax(dim=0).to(dtype=image.dtype, device=image.device)
    return colour.softmax(dim=2) + w2 * position.view(1, 1, -1, 1, 1)


def par_propagate(masks: Tensor, affinity: Tensor, dilations: Sequence[int], num_iter: int) -> Tensor:
    """Apply ``m_i <- sum_j a_ij m_j`` ``num_iter`` times to ``BxCxHxW`` scores.

    Accumulates neighbour by neighbour instead of materialising the ``BxCxNxHxW`` stack, which
    would be N (48) times the size of the scores.
    """
    h, w = masks.shape[-2:]
    for _ in range(num_iter):
        out = torch.zeros_like(masks)
        n = 0
        for d in dilations:
            padded = F.pad(masks, (d, d, d, d), mode="replicate")
            for dy, dx in RING_OFFSETS:
                top, left = d + dy * d, d + dx * d
                out.addcmul_(padded[..., top : top + h, left : left + w], affinity[:, :, n])
                n += 1
        masks = out
    return masks


class PixelAdaptiveRefiner:
    """PAR with ToCo's settings by default; see the module docstring for the exact recipe."""

    name = "par"

    def __init__(
        self,
        dilations: Sequence[int] = TOCO_DILATIONS,
        num_iter: int = TOCO_NUM_ITER,
        w1: float = TOCO_W1,
        w2: float = TOCO_W2,
        downscale: int = 1,
    ) -> None:
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers; got {dilations}")
        if num_iter < 0 or w1 <= 0 or w2 < 0 or downscale < 1:
            raise ValueError("need num_iter >= 0, w1 > 0, w2 >= 0 and downscale >= 1")
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = int(num_iter)
        self.w1 = float(w1)
        self.w2 = float(w2)
        self.downscale = int(downscale)

    def __call__(self, image: Tensor, cams: Tensor, bg_threshold: float | None = None) -> Tensor:
        """Refined scores for ``3xHxW``/``KxHxW`` or batched ``Bx3xHxW``/``BxKxHxW`` inputs."""
        images, scores, single = as_batch(image, cams)
        images = images.to(scores.dtype)
        size = scores.shape[-2:]
        if bg_threshold is not None:
            scores = add_background(scores, bg_threshold)
        if self.downscale > 1:
            small = (max(1, size[0] // self.downscale), max(1, size[1] // self.downscale))
            images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
            scores = F.interpolate(scores, size=small, mode="bilinear", align_corners=False)
        if bg_threshold is not None:
            scores = scores.softmax(dim=1)
        affinity = par_affinity(images, self.dilations, self.w1, self.w2)
        refined = par_propagate(scores, affinity, self.dilations, self.num_iter)
        if refined.shape[-2:] != size:
            refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
        return refined[0] if single else refined
