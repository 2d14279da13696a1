"""Two-component 1-D Gaussian mixture for DuPL's noisy-pixel filter (no scikit-learn needed).

Why: a segmentation head fits clean pseudo-labels first, so their per-pixel losses are small while
wrong labels keep large losses. DuPL fits a two-component Gaussian mixture to the foreground losses
and ignores the pixels that the high-loss component claims with posterior above ``gamma``.

Mirrors DuPL's ``sklearn.mixture.GaussianMixture(n_components=2, max_iter=10, tol=1e-2,
reg_covar=5e-4)``: initialised from a 2-means split (scikit-learn's default k-means init), then EM
until the mean log-likelihood improves by less than ``tol``. Filter rule (``train_final_voc.py``):
fit only on foreground pixels (label neither background nor ignore) whose loss exceeds 0.1, only
when more than 1000 such pixels exist, trust the fit only when the two means are more than 1.0
apart, and ignore every non-background pixel whose posterior for the higher-mean component exceeds
0.95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GMM_MAX_ITER = 10
GMM_TOL = 1e-2
GMM_REG_COVAR = 5e-4
MIN_LOSS = 0.1
MIN_PIXELS = 1000
MIN_GAP = 1.0
GAMMA = 0.95


@dataclass(frozen=True)
class Mixture1d:
    """Weights, means and variances of a 1-D Gaussian mixture (one entry per component)."""

    weights: Tensor
    means: Tensor
    variances: Tensor

    def log_joint(self, x: Tensor) -> Tensor:
        """``N x C``: log of weight times density of each component at each value."""
        x = x.double().reshape(-1, 1)
        return (
            self.weights.log()
            - 0.5 * (math.log(2 * math.pi) + self.variances.log())
            - 0.5 * (x - self.means) ** 2 / self.variances
        )

    def posterior(self, x: Tensor) -> Tensor:
        """``N x C``: responsibility of each component for each value."""
        return self.log_joint(x).softmax(dim=1)


def _m_step(x: Tensor, resp: Tensor, reg_covar: float) -> Mixture1d:
    counts = resp.sum(dim=0) + 10 * torch.finfo(resp.dtype).eps
    means = (resp * x[:, None]).sum(dim=0) / counts
    variances = (resp * (x[:, None] - means) ** 2).sum(dim=0) / counts + reg_covar
    return Mixture1d(counts / x.numel(), means, variances)


def fit_two_gaussians(
    values: Tensor, max_iter: int = GMM_MAX_ITER, tol: float = GMM_TOL, reg_covar: float = GMM_REG_COVAR
) -> Mixture1d:
    """EM fit of two Gaussians to a 1-D sample (at least two values), started from a 2-means split."""
    x = values.detach().double().flatten()
    if x.numel() < 2:
        raise ValueError("need at least two values to fit two components")
    centres = torch.stack([x.min(), x.max()])
    for _ in range(100):
        upper = (x - centres[1]).abs() < (x - centres[0]).abs()
        new = torch.stack(
            [
                x[~upper].mean() if (~upper).any() else centres[0],
                x[upper].mean() if upper.any() else centres[1],
            ]
        )
        if torch.equal(new, centres):
            break
        centres = new
    mixture = _m_step(x, torch.stack([~upper, upper], dim=1).double(), reg_covar)
    previous = -math.inf
    for _ in range(max_iter):
        log_joint = mixture.log_joint(x)
        log_norm = torch.logsumexp(log_joint, dim=1)
        mixture = _m_step(x, (log_joint - log_norm[:, None]).exp(), reg_covar)
        current = float(log_norm.mean())
        if abs(current - previous) < tol:
            break
        previous = current
    return mixture


def noisy_pixels(
    losses: Tensor,
    labels: Tensor,
    background: int = 0,
    ignore_index: int = 255,
    gamma: float = GAMMA,
    min_loss: float = MIN_LOSS,
    min_pixels: int = MIN_PIXELS,
    min_gap: float = MIN_GAP,
) -> Tensor:
    """Boolean ``B x H x W`` mask of the pixels DuPL's GMM filter ignores.

    ``losses`` are per-pixel losses of a head against ``labels`` (``B x H x W`` class ids).
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for i in range(labels.shape[0]):
        roi = (labels[i] != background) & (labels[i] != ignore_index)
        sample = losses[i][roi]
        sample = sample[sample > min_loss]
        if sample.numel() <= min_pixels:
            continue
        mixture = fit_two_gaussians(sample)
        if float((mixture.means[0] - mixture.means[1]).abs()) <= min_gap:
            continue
        noisy = mixture.posterior(losses[i].flatten())[:, int(mixture.means.argmax())] > gamma
        mask[i] = noisy.view_as(labels[i]).to(mask.device) & (labels[i] != background)
    return mask
