"""Dense CRF refinement: noisy labels aligned to a colour edge come out clean."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pydensecrf.densecrf")

from wsss_domains.refine.crf import DenseCRFRefiner, image_to_uint8  # noqa: E402


def _two_tone(h: int = 24, w: int = 32) -> torch.Tensor:
    image = torch.empty(3, h, w)
    image[:, :, : w // 2] = torch.tensor([0.8, 0.2, 0.2]).view(3, 1, 1)
    image[:, :, w // 2 :] = torch.tensor([0.1, 0.3, 0.9]).view(3, 1, 1)
    return (image + 0.02 * torch.randn_like(image)).clamp(0, 1)


def test_image_to_uint8_layout():
    image = torch.zeros(3, 2, 3)
    image[0, 1, 2] = 1.0
    image[2, 0, 0] = 0.5
    array = image_to_uint8(image)
    assert array.shape == (2, 3, 3) and array.dtype.name == "uint8" and array.flags.c_contiguous
    assert array[1, 2, 0] == 255 and array[0, 0, 2] == 128 and array.sum() == 255 + 128


def test_noisy_label_map_is_cleaned_along_the_edge():
    image = _two_tone()
    truth = torch.zeros(24, 32, dtype=torch.long)
    truth[:, 16:] = 1
    flip = torch.rand(24, 32) < 0.2
    noisy = torch.where(flip, 1 - truth, truth)
    cams = torch.stack([(noisy == 0).float(), (noisy == 1).float()])
    assert (cams.argmax(0) != truth).float().mean() > 0.1

    refined = DenseCRFRefiner()(image, cams)
    assert refined.shape == (2, 24, 32)
    assert torch.allclose(refined.sum(0), torch.ones(24, 32), atol=1e-4)
    assert (refined.argmax(0) == truth).all()


def test_background_channel_removes_leak_past_edge():
    image = _two_tone()
    cam = torch.zeros(1, 24, 32)
    cam[:, :, :16] = 0.9
    cam[:, :, 16:20] = 0.7  # leaks four columns into the blue half
    refined = DenseCRFRefiner()(image, cam, bg_threshold=0.5)
    assert refined.shape == (2, 24, 32)
    label = refined.argmax(0)
    assert (label[:, :16] == 1).all() and (label[:, 16:] == 0).all()


def test_batched_matches_single_and_keeps_dtype():
    images = torch.stack([_two_tone(), _two_tone()]).double()
    cams = torch.rand(2, 2, 24, 32, dtype=torch.float64)
    crf = DenseCRFRefiner(num_iter=5)
    batched = crf(images, cams, bg_threshold=0.3)
    assert batched.shape == (2, 3, 24, 32) and batched.dtype == torch.float64
    assert torch.allclose(batched[1], crf(images[1], cams[1], bg_threshold=0.3))
