"""PAR against its defining formula (ToCo's model/PAR.py), computed by hand with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from wsss_domains.refine.background import add_background
from wsss_domains.refine.par import (
    RING_OFFSETS,
    PixelAdaptiveRefiner,
    neighbour_distances,
    par_affinity,
    par_propagate,
)

W1, W2 = 0.3, 0.01


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _hand_affinity(img: list, dilations: tuple[int, ...]) -> list:
    """a[y][x][j] with replicate padding written as coordinate clamping."""
    h, w = len(img[0]), len(img[0][0])
    dists = [d * math.hypot(dy, dx) for d in dilations for dy, dx in RING_OFFSETS]
    pos = _softmax([-((dist / (_std(dists) + 1e-8) / W1) ** 2) for dist in dists])
    aff = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            coords = [
                (min(max(y + dy * d, 0), h - 1), min(max(x + dx * d, 0), w - 1))
                for d in dilations
                for dy, dx in RING_OFFSETS
            ]
            logits = [0.0] * len(coords)
            for c in range(3):
                values = [img[c][ny][nx] for ny, nx in coords]
                sigma = _std(values)
                for j, v in enumerate(values):
                    logits[j] += -((abs(img[c][y][x] - v) / (sigma + 1e-8) / W1) ** 2) / 3
            colour = _softmax(logits)
            aff[y][x] = [(colour[j] + W2 * pos[j], coords[j]) for j in range(len(coords))]
    return aff


def _hand_step(aff: list, mask: list) -> list:
    return [
        [[sum(a * m[ny][nx] for a, (ny, nx) in aff[y][x]) for x in range(len(m[0]))] for y in range(len(m))]
        for m in mask
    ]


@pytest.mark.parametrize("dilations", [(1,), (1, 2), (3, 7)])
def test_affinity_and_iterations_match_hand_computation(dilations):
    image = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    mask = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    hand_aff = _hand_affinity(image[0].tolist(), dilations)

    module_aff = par_affinity(image, dilations, W1, W2)[0, 0]  # N x H x W
    expected_aff = torch.tensor([[[a for a, _ in hand_aff[y][x]] for x in range(5)] for y in range(5)])
    assert (module_aff.permute(1, 2, 0) - expected_aff).abs().max() <= 1e-6

    one = _hand_step(hand_aff, mask[0].tolist())
    two = _hand_step(hand_aff, one)
    affinity = par_affinity(image, dilations, W1, W2)
    assert (par_propagate(mask, affinity, dilations, 1)[0] - torch.tensor(one)).abs().max() <= 1e-6
    assert (par_propagate(mask, affinity, dilations, 2)[0] - torch.tensor(two)).abs().max() <= 1e-6


def test_float32_agrees_with_float64():
    image = torch.rand(1, 3, 9, 7, dtype=torch.float64)
    mask = torch.rand(1, 2, 9, 7, dtype=torch.float64)
    par = PixelAdaptiveRefiner()
    assert (par(image.float(), mask.float()).double() - par(image, mask)).abs().max() <= 1e-5


def test_neighbour_distances_follow_ring_geometry():
    dist = neighbour_distances((1, 4))
    root2 = math.sqrt(2)
    ring = [root2, 1, root2, 1, 1, root2, 1, root2]  # corners of the 3x3 ring are diagonal
    assert torch.allclose(dist, torch.tensor(ring + [4 * v for v in ring], dtype=torch.float64))


def test_each_pixel_weights_sum_to_one_plus_w2():
    affinity = par_affinity(torch.rand(2, 3, 6, 8), w2=W2)
    assert torch.allclose(affinity.sum(dim=2), torch.full((2, 1, 6, 8), 1 + W2), atol=1e-6)
    assert (affinity >= 0).all()


@pytest.mark.parametrize("bg_threshold", [None, 0.4])
def test_shapes_nonnegative_and_batch_consistent(bg_threshold):
    images, cams = torch.rand(2, 3, 12, 10), torch.rand(2, 3, 12, 10)
    par = PixelAdaptiveRefiner()
    batched = par(images, cams, bg_threshold=bg_threshold)
    channels = 3 if bg_threshold is None else 4
    assert batched.shape == (2, channels, 12, 10)
    assert (batched >= 0).all()
    for i in range(2):
        single = par(images[i], cams[i], bg_threshold=bg_threshold)
        assert single.shape == (channels, 12, 10)
        assert torch.allclose(single, batched[i], atol=1e-6)


def test_background_path_is_softmax_then_propagation():
    image, cams = torch.rand(3, 8, 8), torch.rand(2, 8, 8)
    par = PixelAdaptiveRefiner(num_iter=3)
    probs = add_background(cams, 0.3).softmax(dim=0).unsqueeze(0)
    expected = par_propagate(probs, par_affinity(image.unsqueeze(0)), par.dilations, 3)[0]
    assert torch.allclose(par(image, cams, bg_threshold=0.3), expected, atol=1e-6)


def _edge_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Dark left half, bright right half; the CAM covers the left and leaks 3 columns right."""
    image = torch.zeros(3, 16, 32)
    image[:, :, 16:] = 1.0
    image = (image + 0.02 * torch.randn_like(image)).clamp(0, 1)
    cam = torch.zeros(1, 16, 32)
    cam[:, :, :16] = 1.0
    cam[:, :, 16:19] = 0.8
    return image, cam


@pytest.mark.parametrize("downscale", [1, 2])
def test_leak_across_colour_edge_is_pulled_back(downscale):
    image, cam = _edge_scene()
    par = PixelAdaptiveRefiner(downscale=downscale)
    before = add_background(cam, 0.5).argmax(dim=0)
    assert (before[:, 16:19] == 1).all()  # the leak is foreground before refinement

    after = par(image, cam, bg_threshold=0.5).argmax(dim=0)
    assert (after[:, :16] == 1).all() and (after[:, 16:] == 0).all()

    # The edge is what stops it: on a flat image the same CAM spreads past the leak.
    flat = par(torch.full_like(image, 0.5), cam, bg_threshold=0.5).argmax(dim=0)
    assert (flat[:, 16:19] == 1).all()


def test_leak_decays_without_background_channel():
    image, cam = _edge_scene()
    refined = PixelAdaptiveRefiner()(image, cam)
    assert refined[0, :, 16:19].mean() < 0.25 * cam[0, :, 16:19].mean()
    assert refined[0, :, :16].min() > 0.9


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="match the image"):
        PixelAdaptiveRefiner()(torch.rand(3, 8, 8), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="3 \\(RGB\\)"):
        PixelAdaptiveRefiner()(torch.rand(8, 8, 3), torch.rand(2, 8, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    image, cams = torch.rand(2, 3, 40, 48), torch.rand(2, 2, 40, 48)
    par = PixelAdaptiveRefiner()
    cpu = par(image, cams, bg_threshold=0.5)
    gpu = par(image.cuda(), cams.cuda(), bg_threshold=0.5)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)
