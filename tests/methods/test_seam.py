"""SEAM against its defining formulas (YudeWang/SEAM), then two real training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_training import changed, train_steps
from torch import nn
from torch.nn import functional as F

from wsss_domains.methods import create_method
from wsss_domains.methods.seam import (
    PcmCamExtractor,
    equivariance_loss,
    equivariant_cross_loss,
    max_norm,
    max_onehot,
    pcm_seeds,
    pixel_correlation,
    top_mean,
)
from wsss_domains.options import MethodOptionError  # noqa: E402

EPS = 1e-5


def _ramp(h: int, w: int) -> torch.Tensor:
    """A map linear in both coordinates: bilinear resizing with aligned corners reproduces it exactly."""
    ys = torch.linspace(0, 1, h)[:, None]
    xs = torch.linspace(0, 1, w)[None, :]
    return (1 + 2 * ys + 3 * xs)[None, None]


def test_max_norm_is_seams_min_max():
    cams = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[-1.0, 3.0], [3.0, 3.0]]]])
    out = max_norm(cams)
    first = [max(v - 0 - EPS, 0) / (4 - 0 + EPS) for v in (0, 1, 2, 4)]
    second = [max(v - 0 - EPS, 0) / (3 - 0 + EPS) for v in (0, 3, 3, 3)]  # relu first: -1 -> 0
    torch.testing.assert_close(out[0, 0].flatten(), torch.tensor(first))
    torch.testing.assert_close(out[0, 1].flatten(), torch.tensor(second))


def test_er_loss_is_zero_for_a_scale_equivariant_cam():
    # The "model" maps an image to its own first channel: exactly equivariant under rescaling for a
    # ramp image (linear interpolation of a linear function is exact, min and max are kept).
    def model_cams(image: torch.Tensor) -> torch.Tensor:
        return image[:, :1]

    image = _ramp(32, 32).expand(1, 3, 32, 32)
    scaled = F.interpolate(image, scale_factor=0.3, mode="bilinear", align_corners=True)
    loss = equivariance_loss(model_cams(image), model_cams(scaled), torch.ones(1, 1))
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # A "model" whose CAM ignores the image (a fixed ramp the other way round) is not equivariant.
    flipped = model_cams(scaled).flip(-1)
    assert float(equivariance_loss(model_cams(image), flipped, torch.ones(1, 1))) > 0.1


def test_er_loss_of_a_hand_made_pair():
    cams = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[5.0, 1.0], [0.0, 0.0]]]])
    scaled = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 9.0]]]])
    labels = torch.tensor([[1.0, 0.0]])  # the second class is absent: masked out, but counted in the mean
    first = [max(v - EPS, 0) / (4 + EPS) for v in (0, 1, 2, 4)]
    second = [max(v - EPS, 0) / (4 + EPS) for v in (4, 0, 0, 0)]
    expected = sum(abs(a - b) for a, b in zip(first, second, strict=True)) / 8
    assert float(equivariance_loss(cams, scaled, labels)) == pytest.approx(expected, rel=1e-6)


def test_pcm_seeds_keep_the_top_class_and_add_background():
    cams = torch.tensor([[[[2.0, 1.0]], [[1.0, 3.0]]]])  # 1 x 2 classes x 1 x 2 pixels
    seeds = pcm_seeds(cams)
    c0 = [max(v - EPS, 0) / (2 + EPS) for v in (2, 1)]
    c1 = [max(v - EPS, 0) / (3 + EPS) for v in (1, 3)]
    expected = torch.tensor(
        [[[[1 - c0[0], 1 - c1[1]]], [[c0[0], 0.0]], [[0.0, c1[1]]]]]  # background = 1 - top class score
    )
    torch.testing.assert_close(seeds, expected)


def test_pixel_correlation_on_a_tiny_feature_map():
    # Three pixels: the first two share a feature direction, the third is orthogonal to them.
    features = torch.tensor([[[[1.0, 2.0, 0.0]], [[0.0, 0.0, 3.0]]]])  # 1 x D=2 x 1 x 3
    seeds = torch.tensor([[[[1.0, 0.0, 0.4]], [[0.0, 1.0, 0.6]]]])
    out = pixel_correlation(seeds, features)
    # Normalised features f_i = v_i / (|v_i| + eps); a_ij = relu(<f_i, f_j>); out_cj = sum_i s_ci a_ij / (sum_i a_ij + eps)
    n = [1 / (1 + EPS), 1 / (1 + EPS), 1 / (1 + EPS)]
    unit = [(1.0 * n[0], 0.0), (1.0 * n[1], 0.0), (0.0, 1.0 * n[2])]
    a = [[max(unit[i][0] * unit[j][0] + unit[i][1] * unit[j][1], 0) for j in range(3)] for i in range(3)]
    s = seeds[0, :, 0].tolist()
    expected = [
        [sum(s[c][i] * a[i][j] for i in range(3)) / (sum(a[i][j] for i in range(3)) + EPS) for j in range(3)]
        for c in range(2)
    ]
    torch.testing.assert_close(out[0, :, 0], torch.tensor(expected))
    torch.testing.assert_close(
        out[0, :, 0], torch.tensor([[0.5, 0.5, 0.4], [0.5, 0.5, 0.6]]), atol=1e-4, rtol=0
    )


def test_max_onehot_and_top_mean():
    maps = torch.tensor([[[[0.3, 0.2]], [[0.5, 0.1]], [[0.5, 0.7]]]])
    torch.testing.assert_close(
        max_onehot(maps), torch.tensor([[[[0.3, 0.2]], [[0.5, 0.0]], [[0.5, 0.7]]]])
    )  # ties keep both maxima, background untouched
    values = torch.tensor([[[[4.0, 1.0, 3.0, 2.0, 0.0]]]])
    assert float(top_mean(values, 0.4)) == pytest.approx(3.5)  # the top int(5 * 0.4) = 2 entries


def _max_norm(values: list[float]) -> list[float]:
    values = [max(v, 0.0) for v in values]
    low, high = min(values), max(values)
    return [max(v - low - EPS, 0.0) / (high - low + EPS) for v in values]


def test_ecr_of_a_hand_made_pair():
    # One class on 1x2 maps, both views already at the same size (no resizing involved).
    cams = torch.tensor([[[[0.0, 2.0]]]])
    scaled = torch.tensor([[[[3.0, 1.0]]]])
    pcm = torch.tensor([[[[0.5, 1.0]], [[2.0, 0.0]]]])  # background first
    pcm_scaled = torch.tensor([[[[1.0, 1.0]], [[0.0, 4.0]]]])
    fg1, fg2 = _max_norm([0.0, 2.0]), _max_norm([3.0, 1.0])
    first = [1 - v for v in fg1] + fg1  # [background..., class...]; one class: max_onehot keeps all
    second = [1 - v for v in fg2] + fg2
    pcm1 = _max_norm([0.5, 1.0]) + _max_norm([2.0, 0.0])
    pcm2 = _max_norm([1.0, 1.0]) + _max_norm([0.0, 4.0])
    k = max(1, int(4 * 0.2))
    ecr1 = sorted((abs(a - b) for a, b in zip(second, pcm1, strict=True)), reverse=True)[:k]
    ecr2 = sorted((abs(a - b) for a, b in zip(first, pcm2, strict=True)), reverse=True)[:k]
    expected = sum(ecr1) / k + sum(ecr2) / k
    loss = equivariant_cross_loss(cams, scaled, pcm, pcm_scaled, torch.ones(1, 1), 0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(1.0, abs=1e-3)


def test_two_training_steps_and_pcm_extractor():
    method = create_method("seam")
    task, logged, initial = train_steps(method)
    for name in ("train/cls_loss", "train/cls_scaled", "train/rvmin", "train/er", "train/ecr"):
        assert name in logged and torch.isfinite(torch.tensor(logged[name])), name
    assert changed(task, initial, "pcm")  # the ECR loss trains the PCM
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0, 0.5))
    assert isinstance(extractor, PcmCamExtractor)
    cams = extractor(torch.randn(3, 40, 48))
    assert cams.shape == (2, 40, 48)
    # min-max: the peak is (max - min - 1e-5) / (max - min + 1e-5), just under 1
    assert float(cams.min()) == 0 and float(cams.max()) == pytest.approx(1.0, abs=1e-3)


def _infer_seam_normalisation(sum_cam: np.ndarray) -> np.ndarray:
    """infer_SEAM.py (and CPN's infer_cam.py) on the summed ``K x H x W`` maps."""
    sum_cam = sum_cam.copy()
    sum_cam[sum_cam < 0] = 0
    cam_max = np.max(sum_cam, (1, 2), keepdims=True)
    cam_min = np.min(sum_cam, (1, 2), keepdims=True)
    sum_cam[sum_cam < cam_min + 1e-5] = 0
    return (sum_cam - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)


def test_pcm_extractor_normalises_as_infer_seam():
    rng = np.random.default_rng(0)
    extractor = PcmCamExtractor(nn.Identity(), nn.Identity(), (-3, -2))
    signed = rng.normal(1.0, 0.5, size=(3, 5, 6)).astype(np.float32)  # rectified first
    # the official entries below the minimum + 1e-5 turn negative; here they are 0
    expected = np.maximum(_infer_seam_normalisation(signed), 0)
    np.testing.assert_allclose(extractor.normalize(torch.from_numpy(signed)).numpy(), expected, atol=1e-6)
    # flat PCM maps, high everywhere: one class rising along the rows, the other along the columns
    rows, cols = np.meshgrid(np.linspace(0, 1, 5), np.linspace(0, 1, 6), indexing="ij")
    total = (0.9 + 0.1 * np.stack([rows, cols]) + rng.uniform(0, 1e-3, (2, 5, 6))).astype(np.float32)
    official = _infer_seam_normalisation(total)
    out = extractor.normalize(torch.from_numpy(total)).numpy()
    np.testing.assert_allclose(out, np.maximum(official, 0), atol=1e-6)
    background = np.full((1, 5, 6), 0.26, np.float32)  # infer_SEAM.py's out_cam_pred_alpha
    labels = np.argmax(np.concatenate([background, out]), 0)
    assert (labels == np.argmax(np.concatenate([background, official]), 0)).all()
    assert (labels == 0).any()  # the shift leaves pixels to the background ...
    only_max = PcmCamExtractor(nn.Identity(), nn.Identity(), (-3, -2), subtract_minimum=False)
    scaled = only_max.normalize(torch.from_numpy(total)).numpy()
    assert (scaled > 0.26).all()  # ... which division by the maximum alone does not
    assert create_method("seam").extractor(nn.Identity(), {"pcm": nn.Identity()}).subtract_minimum


def test_seam_rejects_bad_options():
    with pytest.raises(ValueError):
        create_method("seam", scale_factor=1.5)
    with pytest.raises(MethodOptionError, match="'seam' has no option 'unknown'.*scale_factor"):
        create_method("seam", unknown=1)
