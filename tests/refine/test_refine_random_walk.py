"""Colour-affinity random walk: the transition is row-stochastic, one step is the hand computation, and
the normalisation and background are IRN's (``step/make_sem_seg_labels.py``) on fixed inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss_domains.domains import create_domain
from wsss_domains.methods import create_method
from wsss_domains.methods.base import RefineContext
from wsss_domains.pseudo_labels.assemble import cams_to_labels
from wsss_domains.refine.random_walk import (
    RandomWalkRefiner,
    disc_offsets,
    propagate,
    transition_matrix,
)


def test_disc_offsets_are_strictly_inside_radius():
    offsets = set(disc_offsets(5))
    assert (0, 0) in offsets and (0, 4) in offsets and (-3, 3) in offsets
    assert (0, 5) not in offsets and (3, 4) not in offsets
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert set(disc_offsets(2)) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_transition_is_row_stochastic_and_nonnegative():
    dense = transition_matrix(torch.rand(4, 7, 6), radius=3, beta=5.0).to_dense()
    assert dense.shape == (42, 42)
    assert (dense >= 0).all()
    assert torch.allclose(dense.sum(dim=1), torch.ones(42), atol=1e-6)


def test_one_step_on_3x3_grid_matches_hand_computation():
    features = torch.rand(4, 3, 3, dtype=torch.float64)
    cams = torch.rand(2, 3, 3, dtype=torch.float64)
    beta, radius = 3.0, 2  # radius 2 links the 8-neighbourhood, not pixels two apart
    f, c = features.tolist(), cams.tolist()
    pixels = [(y, x) for y in range(3) for x in range(3)]
    aff = [[0.0] * 9 for _ in range(9)]
    for i, (yi, xi) in enumerate(pixels):
        for j, (yj, xj) in enumerate(pixels):
            if (yi - yj) ** 2 + (xi - xj) ** 2 < radius**2:
                l1 = sum(abs(f[ch][yi][xi] - f[ch][yj][xj]) for ch in range(4)) / 4
                aff[i][j] = math.exp(-l1) ** beta
    trans = [[a / sum(row) for a in row] for row in aff]
    expected = [
        [[sum(trans[3 * y + x][3 * v + u] * c[k][v][u] for v in range(3) for u in range(3)) for x in range(3)]
         for y in range(3)]
        for k in range(2)
    ]  # fmt: skip

    transition = transition_matrix(features, radius=radius, beta=beta)
    assert (transition.to_dense() - torch.tensor(trans)).abs().max() <= 1e-6
    assert (propagate(cams, transition, 1) - torch.tensor(expected)).abs().max() <= 1e-6


def test_walk_stays_within_affinity_region():
    features = torch.zeros(3, 6, 10)
    features[:, :, 5:] = 3.0  # two groups, mean L1 distance 3 -> affinity exp(-3*beta) across
    seed = torch.zeros(1, 6, 10)
    seed[0, 2, 1] = 1.0
    walked = propagate(seed, transition_matrix(features, radius=3, beta=4.0), 200)
    left, right = walked[0, :, :5], walked[0, :, 5:]
    assert left.min() > 0.5 * left.max()  # spread over the whole left group
    assert right.max() < 1e-3 * left.min()


def test_zero_steps_at_stride_one_is_the_globally_normalised_input():
    image, cams = torch.rand(3, 8, 6), torch.rand(2, 8, 6)
    out = RandomWalkRefiner(steps=0, stride=1)(image, cams)
    assert torch.allclose(out, cams / cams.max(), atol=1e-6)


@pytest.mark.parametrize("bg_threshold", [None, 0.3])
def test_refiner_shapes_range_and_background(bg_threshold):
    image, cams = torch.rand(2, 3, 32, 40), torch.rand(2, 2, 32, 40)
    out = RandomWalkRefiner()(image, cams, bg_threshold=bg_threshold)
    if bg_threshold is None:
        assert out.shape == (2, 2, 32, 40)
        assert out.min() >= 0 and torch.allclose(out.flatten(1).amax(1), torch.ones(2))
    else:
        assert out.shape == (2, 3, 32, 40)
        assert torch.equal(out[:, 0], torch.full((2, 32, 40), 0.3))
        assert torch.allclose(out[:, 1:].flatten(1).amax(1), torch.ones(2))


def test_features_replace_colours_as_affinity_source():
    image = torch.rand(3, 16, 16)  # colours carry no structure here
    features = torch.zeros(8, 4, 4)
    features[:, :, 2:] = 5.0
    cam = torch.zeros(1, 16, 16)
    cam[:, :, :8] = 1.0
    cam[:, :4, 8:12] = 1.0  # leak into the other feature group
    out = RandomWalkRefiner(stride=4)(image, cam, features=features)
    assert out.shape == (1, 16, 16)
    # On the 4x4 grid the leak is 1 of the 8 cells of the right feature group: the walk averages it
    # over that group (1/8 everywhere) and none of it reaches, or is lost from, the left group.
    assert torch.allclose(out[0, :, 12:], torch.full((16, 4), 1 / 8), atol=1e-4)
    assert out[0, :, :6].min() > 1 - 1e-4


def _irn_labels_reference(
    features: torch.Tensor,
    coarse: torch.Tensor,
    size: tuple[int, int],
    beta: float,
    exp_times: int,
    radius: int,
    sem_seg_bg_thres: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN's walk, normalisation and background, transcribed with a colour affinity in place of the
    learned one: jiwoon-ahn/irn ``misc/indexing.py::to_transition_matrix`` / ``propagate_to_edge``
    (without the boundary map's ``1 - edge``) and ``step/make_sem_seg_labels.py`` lines 41-47. The
    affinity is AffinityNet's form ``exp(-mean_c |f_i - f_j|) ** beta`` over ``dy^2 + dx^2 < r^2``."""
    c, h, w = features.shape
    f = features.reshape(c, h * w).double()
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2 < radius**2
    affinity_dense = torch.exp(-(f[:, :, None] - f[:, None, :]).abs().mean(dim=0)) * near
    scaled_affinity = torch.pow(affinity_dense, beta)
    trans_mat = scaled_affinity / torch.sum(scaled_affinity, dim=0, keepdim=True)
    for _ in range(exp_times):
        trans_mat = torch.matmul(trans_mat, trans_mat)
    x = coarse.double()
    rw = torch.matmul(x.view(-1, h * w), trans_mat)
    rw = rw.view(rw.size(0), 1, h, w)
    rw_up = F.interpolate(rw, scale_factor=size[0] // h, mode="bilinear", align_corners=False)[..., 0, :, :]
    rw_up = rw_up / torch.max(rw_up)
    rw_up_bg = F.pad(rw_up, (0, 0, 0, 0, 1, 0), value=sem_seg_bg_thres)
    return rw_up_bg, torch.argmax(rw_up_bg, dim=0)


def _fixed_walk_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image 24x32 with two colour regions; a strong CAM (peak 1) on one, a weak one (peak 0.35) on
    the other, both leaking a little; the walk's features are the image at stride 2 over sigma 0.1."""
    gen = torch.Generator().manual_seed(3)
    image = torch.empty(3, 24, 32)
    image[:] = torch.tensor([0.3, 0.6, 0.3]).view(3, 1, 1)
    image[:, 4:18, 2:14] = torch.tensor([0.8, 0.2, 0.2]).view(3, 1, 1)
    image[:, 6:20, 18:30] = torch.tensor([0.2, 0.2, 0.8]).view(3, 1, 1)
    image = (image + 0.02 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    strong = torch.exp(-(((yy - 11) / 6) ** 2 + ((xx - 8) / 6) ** 2))
    weak = 0.35 * torch.exp(-(((yy - 13) / 6) ** 2 + ((xx - 24) / 6) ** 2))
    cams = torch.stack([strong / strong.max(), weak])
    return image, cams, F.interpolate(image[None], size=(12, 16), mode="area")[0] / 0.1


def test_refiner_matches_irn_normalisation_and_background_on_fixed_inputs():
    image, cams, features = _fixed_walk_inputs()
    coarse = F.interpolate(cams[None], size=(12, 16), mode="area")[0]
    expected, labels = _irn_labels_reference(features, coarse, (24, 32), 8.0, 3, 5, 0.25)

    out = RandomWalkRefiner(beta=8.0, steps=2**3, radius=5, stride=2)(image, cams, bg_threshold=0.25)
    assert out.shape == (3, 24, 32)
    assert (out.double() - expected).abs().max() < 1e-5
    assert torch.equal(out.argmax(0), labels)

    # The inputs tell IRN's global maximum from a per-class one: normalising each class by its own
    # maximum would hand the weak class pixels that IRN leaves to the background.
    per_class = expected[1:] / expected[1:].flatten(1).amax(1)[:, None, None]
    inflated = torch.cat([expected[:1], per_class]).argmax(0)
    assert (inflated == 2).sum() > (labels == 2).sum() > 0 and (labels == 0).any() and (labels == 1).any()


def test_method_labels_are_irn_labels_in_a_threshold_domain():
    """Through the method and the engine's threshold rule (VOC, t = 0.3): IRN's ``keys[rw_pred]``."""
    domain = create_domain("voc")
    space = domain.dataset("voc2012").label_space
    threshold = domain.background_threshold(space)
    image, cams, _ = _fixed_walk_inputs()
    present = torch.zeros(len(space.foreground))
    present[[4, 11]] = 1.0
    full = torch.zeros(len(space.foreground), 24, 32)
    full[present.bool()] = cams

    method = create_method("random-walk", steps=8, stride=2)
    refined = method.refine(full, RefineContext.of(image, present, domain, space))
    labels = cams_to_labels(refined, present, space, threshold)

    features = F.interpolate(image[None], size=(12, 16), mode="area")[0] / 0.1
    coarse = F.interpolate(cams[None], size=(12, 16), mode="area")[0]
    expected, rw_pred = _irn_labels_reference(features, coarse, (24, 32), 8.0, 3, 5, threshold)
    keys = torch.tensor([space.background_index, *[space.foreground[i] for i in (4, 11)]])
    assert torch.equal(labels, keys[rw_pred])
    assert (refined[present.bool()].double() - expected[1:]).abs().max() < 1e-5
    assert torch.equal(refined[~present.bool()], full[~present.bool()])
