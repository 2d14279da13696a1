"""Random walk: the transition matrix is row-stochastic and one step is the hand computation."""

from __future__ import annotations

import math

import pytest
import torch

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


def test_zero_steps_at_stride_one_is_identity():
    image, cams = torch.rand(3, 8, 6), torch.rand(2, 8, 6)
    out = RandomWalkRefiner(steps=0, stride=1)(image, cams)
    assert torch.allclose(out, cams, atol=1e-6)


@pytest.mark.parametrize("bg_threshold", [None, 0.3])
def test_refiner_shapes_range_and_background(bg_threshold):
    image, cams = torch.rand(2, 3, 32, 40), torch.rand(2, 2, 32, 40)
    out = RandomWalkRefiner()(image, cams, bg_threshold=bg_threshold)
    if bg_threshold is None:
        assert out.shape == (2, 2, 32, 40)
        assert out.min() >= cams.min() - 1e-6 and out.max() <= cams.max() + 1e-6
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
