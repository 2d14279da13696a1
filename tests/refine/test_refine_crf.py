"""Dense CRF: AffinityNet's recipe on fixed inputs, edge-aligned cleaning, and background kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("pydensecrf.densecrf")

import pydensecrf.densecrf as dcrf  # noqa: E402

from wsss_domains.refine.crf import DenseCRFRefiner, alpha_for_threshold, image_to_uint8  # noqa: E402


def _two_tone(h: int = 24, w: int = 32) -> torch.Tensor:
    image = torch.empty(3, h, w)
    image[:, :, : w // 2] = torch.tensor([0.8, 0.2, 0.2]).view(3, 1, 1)
    image[:, :, w // 2 :] = torch.tensor([0.1, 0.3, 0.9]).view(3, 1, 1)
    return (image + 0.02 * torch.randn_like(image)).clamp(0, 1)


def _psa_crf_with_alpha(orig_img: np.ndarray, v: np.ndarray, alpha: float) -> np.ndarray:
    """Transcribed from jiwoon-ahn/psa ``infer_cls.py::_crf_with_alpha`` and ``tool/imutils.py::
    crf_inference`` (t=10, scale_factor=1), with pydensecrf's ``unary_from_softmax`` inlined."""
    bg_score = np.power(1 - np.max(v, axis=0, keepdims=True), alpha)
    bgcam_score = np.concatenate((bg_score, v), axis=0)
    h, w = orig_img.shape[:2]
    n_labels = bgcam_score.shape[0]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = -np.log(np.clip(bgcam_score, 1e-5, 1.0)).reshape([n_labels, -1]).astype(np.float32)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=3 / 1, compat=3)
    d.addPairwiseBilateral(sxy=80 / 1, srgb=13, rgbim=np.copy(orig_img), compat=10)
    q = d.inference(10)
    return np.array(q).reshape((n_labels, h, w))


def _fixed_inputs(h: int = 40, w: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image with a red and a blue object on green, and a strong and a weaker CAM over them."""
    rng = np.random.default_rng(7)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:] = (40, 120, 60)
    img[6:30, 4:26] = (200, 40, 40)
    img[8:28, 34:50] = (40, 40, 200)
    img = np.clip(img.astype(int) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    a = np.exp(-(((yy - 18) / 10.0) ** 2 + ((xx - 15) / 10.0) ** 2))
    b = 0.7 * np.exp(-(((yy - 18) / 12.0) ** 2 + ((xx - 42) / 10.0) ** 2))
    return np.ascontiguousarray(img), np.stack([a / a.max(), b]).astype(np.float32)


@pytest.mark.parametrize("alpha", [None, 4.0, 32.0])
def test_matches_affinitynet_crf_with_alpha_on_fixed_inputs(alpha):
    img, v = _fixed_inputs()
    threshold = 0.3
    # Default: alpha is the exponent at which (1 - t)^alpha == t, i.e. ln t / ln(1 - t).
    psa_alpha = alpha if alpha is not None else math.log(threshold) / math.log(1 - threshold)
    expected = _psa_crf_with_alpha(img, v, psa_alpha)

    image = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    out = DenseCRFRefiner(alpha=alpha)(image, torch.from_numpy(v), bg_threshold=threshold)
    assert out.shape == expected.shape == (3, 40, 56)
    assert np.abs(out.numpy() - expected).max() < 1e-5
    # The inputs are not degenerate: background and both classes all occur.
    assert set(np.unique(expected.argmax(0))) == {0, 1, 2}


def test_no_background_uses_raw_cams_as_unary():
    img, v = _fixed_inputs()
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(v, 1e-5, 1.0)).reshape(2, -1).astype(np.float32)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(img), compat=10)
    expected = np.array(d.inference(10)).reshape(2, h, w)
    image = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    out = DenseCRFRefiner()(image, torch.from_numpy(v))
    assert np.abs(out.numpy() - expected).max() < 1e-5


def test_alpha_for_threshold_crosses_at_the_threshold():
    for t in (0.05, 0.25, 0.3, 0.7):
        assert (1 - t) ** alpha_for_threshold(t) == pytest.approx(t)
    assert alpha_for_threshold(0.2755) == pytest.approx(4.0, abs=0.01)  # psa's low alpha
    with pytest.raises(ValueError, match="bg_threshold"):
        alpha_for_threshold(1.0)


def test_image_to_uint8_layout():
    image = torch.zeros(3, 2, 3)
    image[0, 1, 2] = 1.0
    image[2, 0, 0] = 0.5
    array = image_to_uint8(image)
    assert array.shape == (2, 3, 3) and array.dtype.name == "uint8" and array.flags.c_contiguous
    assert array[1, 2, 0] == 255 and array[0, 0, 2] == 128 and array.sum() == 255 + 128


def test_noisy_label_map_is_cleaned_along_the_edge():
    torch.manual_seed(0)
    image = _two_tone()
    truth = torch.zeros(24, 32, dtype=torch.long)
    truth[:, 16:] = 1
    flip = torch.rand(24, 32) < 0.2
    noisy = torch.where(flip, 1 - truth, truth)
    cams = torch.stack([(noisy == 0).float(), (noisy == 1).float()]).clamp(0.2, 0.8)
    assert (cams.argmax(0) != truth).float().mean() > 0.1

    refined = DenseCRFRefiner()(image, cams)
    assert refined.shape == (2, 24, 32)
    assert torch.allclose(refined.sum(0), torch.ones(24, 32), atol=1e-4)
    assert (refined.argmax(0) == truth).all()


def test_background_channel_removes_leak_past_edge():
    torch.manual_seed(0)
    image = _two_tone()
    cam = torch.zeros(1, 24, 32)
    cam[:, :, :16] = 0.9
    cam[:, :, 16:20] = 0.6  # leaks four columns into the blue half, above the threshold
    refined = DenseCRFRefiner()(image, cam, bg_threshold=0.5)
    assert refined.shape == (2, 24, 32)
    label = refined.argmax(0)
    assert (label[:, :16] == 1).all() and (label[:, 16:] == 0).all()


def test_one_class_keeps_background():
    """The old recipe softmaxed over the present classes only: one class took every pixel."""
    torch.manual_seed(0)
    image = _two_tone()
    cam = torch.zeros(1, 24, 32)
    cam[:, :, :16] = 0.8
    refined = DenseCRFRefiner()(image, cam, bg_threshold=0.3)
    label = refined.argmax(0)
    assert (label[:, 16:] == 0).all() and (label[:, :16] == 1).all()


def test_batched_matches_single_and_keeps_dtype():
    torch.manual_seed(0)
    images = torch.stack([_two_tone(), _two_tone()]).double()
    cams = torch.rand(2, 2, 24, 32, dtype=torch.float64)
    crf = DenseCRFRefiner(num_iter=5)
    batched = crf(images, cams, bg_threshold=0.3)
    assert batched.shape == (2, 3, 24, 32) and batched.dtype == torch.float64
    assert torch.allclose(batched[1], crf(images[1], cams[1], bg_threshold=0.3))
