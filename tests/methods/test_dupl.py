"""DuPL against its defining formulas (Wu0409/DuPL, train_final_voc.py), then training."""

from __future__ import annotations

import math

import pytest
import torch
from method_training import train_steps
from torch import nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods import create_method
from wsss_domains.methods.dupl import discrepancy_loss
from wsss_domains.methods.gmm import fit_two_gaussians, noisy_pixels
from wsss_domains.methods.online_labels import multi_scale_cams, refined_labels, segmentation_loss
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.refine.par import PixelAdaptiveRefiner


def test_discrepancy_loss_by_hand():
    # 1 image, 2 channels, 3 pixels: the cosine is taken along the spatial axis of each channel.
    f1 = torch.tensor([[[1.0, 0.0, 1.0], [1.0, 2.0, 3.0]]])
    f2 = torch.tensor([[[0.0, 1.0, 1.0], [2.0, 4.0, 6.0]]])

    def cos(u: list[float], v: list[float]) -> float:
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / max(math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)), 1e-6)

    mean_cos = (cos([1, 0, 1], [0, 1, 1]) + cos([1, 2, 3], [2, 4, 6])) / 2  # (0.5 + 1) / 2
    a, b = f1.view(1, 2, 1, 3).requires_grad_(), f2.view(1, 2, 1, 3).requires_grad_()
    loss = discrepancy_loss(a, b)
    assert float(loss.detach()) == pytest.approx(2 * (1 + mean_cos), rel=1e-6)
    loss.backward()  # each student is pushed from the other's detached features: both get gradients
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_gmm_separates_a_bimodal_loss_sample():
    gen = torch.Generator().manual_seed(0)
    clean = 0.5 + 0.1 * torch.randn(1500, generator=gen)
    noisy = 3.0 + 0.3 * torch.randn(600, generator=gen)
    mixture = fit_two_gaussians(torch.cat([clean, noisy]))
    high = int(mixture.means.argmax())
    assert float(mixture.means[high]) == pytest.approx(3.0, abs=0.05)
    assert float(mixture.means[1 - high]) == pytest.approx(0.5, abs=0.05)
    assert float(mixture.weights[high]) == pytest.approx(600 / 2100, abs=0.02)
    assert float(mixture.variances[high]) ** 0.5 == pytest.approx(0.3, abs=0.03)


def test_noisy_pixel_filter_flags_the_high_loss_foreground_component():
    gen = torch.Generator().manual_seed(0)
    h, w = 50, 50
    labels = torch.ones(1, h, w, dtype=torch.long)  # class 1 everywhere...
    labels[0, :10] = 0  # ...but the first 10 rows are background
    losses = 0.5 + 0.1 * torch.randn(1, h, w, generator=gen).abs()
    wrong = torch.zeros(1, h, w, dtype=torch.bool)
    wrong[0, 30:40] = True  # 500 foreground pixels with large losses: the noisy component
    losses[wrong] = 3.0 + 0.3 * torch.randn(int(wrong.sum()), generator=gen)
    losses[0, :2] = 5.0  # large-loss background pixels are never flagged
    mask = noisy_pixels(losses, labels)
    assert torch.equal(mask, wrong)
    # Too few foreground pixels above 0.1 (<= min_pixels): no fit, nothing flagged.
    assert not noisy_pixels(losses, labels, min_pixels=2000).any()
    # One component only (means closer than min_gap): nothing flagged.
    assert not noisy_pixels(0.5 + 0.1 * torch.rand(1, h, w, generator=gen), labels).any()


def test_multi_scale_cams_take_the_mirror_max_and_min_max_normalise():
    # A "model" whose CAM is the image's first channel plus a fixed left-to-right ramp: the mirror's
    # CAM flipped back is the image plus the reversed ramp, and the two are combined by a max.
    ramp = torch.tensor([0.0, 1.0, 2.0, 3.0])
    a = [0.0, 1.0, 3.0, -1.0]
    image = torch.tensor(a).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    cams = multi_scale_cams(lambda x: x[:, :1] + ramp, image, scales=(1.0,))
    fused = [max(v + r, v + q, 0.0) for v, r, q in zip(a, [0, 1, 2, 3], [3, 2, 1, 0], strict=True)]
    low, high = min(fused), max(fused)
    expected = [(v - low) / (high - low + 1e-5) for v in fused]  # [1/3, 1/3, 1, 0]
    torch.testing.assert_close(cams[0, 0, 0], torch.tensor(expected))


class RampCams(nn.Module):
    """A "classifier" whose two class maps, at the input's resolution, are a channel plus a ramp."""

    def cams(self, x: torch.Tensor, rectify: bool = True) -> torch.Tensor:
        ramp = torch.linspace(-1.0, 2.0, x.shape[-1])
        maps = torch.stack([x[:, 0] + ramp, x[:, 1] - 2 * ramp], dim=1)
        return F.relu(maps) if rectify else maps


def official_siamese_cams(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """utils/cam_helper.py::multi_scale_cam2_siamese at scale 1.0 (the model's raw CAM, no ReLU)."""
    b, _, h, w = inputs.shape
    _cam = model.cams(torch.cat([inputs, inputs.flip(-1)], dim=0), rectify=False)
    _cam = F.interpolate(_cam, size=(h, w), mode="bilinear", align_corners=False)
    _cam = torch.max(_cam[:b, ...], _cam[b:, ...].flip(-1))
    cam = torch.sum(torch.stack([F.relu(_cam)], dim=0), dim=0)
    cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
    cam /= F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5
    return cam


def test_pseudo_label_cams_are_infer_cam_vocs():
    model = RampCams()
    image = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(0))
    extractor = create_method("dupl").extractor(model, nn.ModuleDict(), scales=(1.0,))
    expected = official_siamese_cams(model, image[None])[0]
    torch.testing.assert_close(extractor(image), expected)
    # The summed mirrors of the classic CAM differ: the ramp makes the image and its mirror disagree.
    classic = CamExtractor(model, scales=(1.0,))(image)
    assert (classic - expected).abs().max() > 0.05


def test_refined_labels_map_channels_to_class_ids():
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, 4:12, 4:12] = 1.0
    cams = torch.zeros(1, 2, 16, 16)
    cams[0, 1, 4:12, 4:12] = 1.0  # only class 1 (id 2) is present and confident on the square
    labels = torch.tensor([[0.0, 1.0]])
    out = refined_labels(image, cams, labels, PixelAdaptiveRefiner(downscale=1))
    assert set(out.unique().tolist()) <= {0, 2, 255}
    assert (out[0, 6:10, 6:10] == 2).all() and (out[0, :2, :2] == 0).all()
    assert (refined_labels(image, cams, torch.zeros(1, 2), PixelAdaptiveRefiner()) == 0).all()


def test_segmentation_loss_averages_background_and_foreground_parts():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[0.0, 0.5, 3.0]]]])  # 3 classes x 1 x 3
    target = torch.tensor([[[0, 2, 255]]])
    ce = F.cross_entropy(logits, target, reduction="none", ignore_index=255)[0, 0]
    assert float(segmentation_loss(logits, target)) == pytest.approx(
        0.5 * (float(ce[0]) + float(ce[1])), rel=1e-6
    )
    only_bg = torch.tensor([[[0, 0, 255]]])
    expected = 0.5 * float(F.cross_entropy(logits, only_bg, ignore_index=255))
    assert float(segmentation_loss(logits, only_bg)) == pytest.approx(expected, rel=1e-6)


def test_warm_up_has_no_segmentation_loss():
    method = create_method("dupl", seg_channels=8)
    model = CamClassifier(num_classes=2, backbone="test_efficientnet", weights="random")
    modules = method.build_modules(model)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.ones(2, 2), "progress": torch.tensor(0.05)}
    losses = method.training_losses(model, modules, batch, model(batch["image"]))
    assert set(losses) == {"cls2", "discrepancy"}


class _Constant(torch.nn.Module):
    """A segmentation head with the same logits at every pixel."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        return self.logits.view(1, -1, 1, 1).expand(b, -1, h, w)


def test_each_head_learns_from_the_other_students_labels(monkeypatch):
    method = create_method("dupl", cam_phase=0.0, gmm_phase=1.0, seg_channels=8)
    model = CamClassifier(num_classes=2, backbone="test_efficientnet", weights="random")
    modules = method.build_modules(model)
    modules["seg1"] = _Constant([0.0, 0.0, 4.0])  # head 1 predicts class 2 everywhere
    modules["seg2"] = _Constant([0.0, 4.0, 0.0])  # head 2 predicts class 1 everywhere
    image = torch.randn(1, 3, 32, 32)
    first = torch.zeros(1, 32, 32, dtype=torch.long)
    first[..., :16] = 1
    second = torch.full((1, 32, 32), 2, dtype=torch.long)
    made = iter([first, second])  # student 1's labels are made first, then student 2's
    highs: list[torch.Tensor] = []

    def fake_labels(image, cams, labels, high):
        highs.append(high)
        return next(made)

    monkeypatch.setattr(method, "pseudo_labels", fake_labels)
    batch = {"image": image, "label": torch.ones(1, 2), "progress": torch.tensor(0.5)}
    outputs = model(image)
    losses = method.training_losses(model, modules, batch, outputs)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)

    seg1 = up(modules["seg1"](outputs["features"]))
    seg2 = up(modules["seg2"](modules["backbone2"].forward_features(image)))
    crossed = 0.2 * (segmentation_loss(seg1, second) + segmentation_loss(seg2, first))
    own = 0.2 * (segmentation_loss(seg1, first) + segmentation_loss(seg2, second))
    assert float(losses["seg"]) == pytest.approx(float(crossed), rel=1e-5)
    assert abs(float(crossed) - float(own)) > 0.5  # the pairing is visible in the loss
    # Both students' labels use the scheduled per-image high threshold (0.55 targets outside VOC).
    for high in highs:
        torch.testing.assert_close(high, method.high_thresholds(batch["label"], 0.5))
    assert 0.55 < float(highs[0][0]) < 0.7


def test_two_training_steps_with_every_phase_on():
    method = create_method("dupl", cam_phase=0.0, gmm_phase=0.0, gmm_min_pixels=10, seg_channels=16)
    task, logged, initial = train_steps(method)
    for name in ("train/cls_loss", "train/cls2", "train/discrepancy", "train/seg", "train/consistency"):
        assert name in logged and math.isfinite(logged[name]), name
    now = task.method_modules.state_dict()
    for prefix in ("backbone2.", "head2.", "seg1.", "seg2."):
        assert any(not torch.equal(now[k], initial[k]) for k in initial if k.startswith(prefix)), prefix
    # The second backbone starts as a copy of the first and trains at the backbone's learning rate.
    groups = task.configure_optimizers().param_groups
    backbone2 = {id(p) for p in task.method_modules["backbone2"].parameters()}
    assert backbone2 <= {id(p) for p in groups[0]["params"]}
    assert groups[0]["lr"] < groups[1]["lr"]
    cams = method.extractor(task.model, task.method_modules, scales=(1.0,))(torch.randn(3, 32, 40))
    assert cams.shape == (2, 32, 40)


def test_dupl_rejects_bad_phases():
    with pytest.raises(ValueError):
        create_method("dupl", cam_phase=0.5, gmm_phase=0.2)
