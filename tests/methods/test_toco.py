"""ToCo against its defining formulas (rulixiang/ToCo), the ViT CAM classifier, then training."""

from __future__ import annotations

import math

import pytest
import torch
from method_training import changed, train_steps

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.methods import create_method
from wsss_domains.methods.toco import (
    affinity_mask,
    cam_labels,
    class_token_contrast,
    local_crops,
    momentum_update,
    patch_token_contrast,
)
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.models.vit import VitCamClassifier, is_vit_backbone
from wsss_domains.training.run import RunConfig, build_model

VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit() -> VitCamClassifier:
    torch.manual_seed(0)
    return VitCamClassifier(num_classes=2, backbone=VIT, weights="random").eval()


def test_vit_classifier_lays_patch_tokens_out_as_a_feature_map(vit):
    x = torch.randn(1, 3, 40, 56)  # not a multiple of 16: padded to a 3 x 4 patch grid
    tokens = vit.backbone.forward_features(x)
    out = vit(x)
    assert out["features"].shape == (1, 192, 3, 4) and out["cams"].shape == (1, 2, 3, 4)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(out["features"][0, :, i, j], tokens[0, 1 + i * 4 + j])
    torch.testing.assert_close(out["class_token"], tokens[:, 0])
    torch.testing.assert_close(out["cams"], vit.head(out["features"]))
    torch.testing.assert_close(out["logits"], out["cams"].mean(dim=(2, 3)))
    assert CamExtractor(vit, scales=(1.0, 0.5))(torch.randn(3, 50, 70)).shape == (2, 50, 70)


def test_vit_backbones_are_recognised_and_built_for_runs():
    assert is_vit_backbone(VIT) and is_vit_backbone("deit_tiny_patch16_224")
    assert not is_vit_backbone("tf_efficientnet_lite0") and not is_vit_backbone("no_such_model")
    config = RunConfig(
        domain="d", dataset="s", classes=["bg", "a"], foreground=["a"], backbone=VIT, weights="random"
    )
    assert isinstance(build_model(config), VitCamClassifier)
    config.backbone = "test_efficientnet"
    model = build_model(config)
    assert type(model) is CamClassifier


def test_cam_labels_ignore_the_middle_band():
    cams = torch.tensor([[[[0.9, 0.5, 0.2, 0.8]], [[0.1, 0.6, 0.1, 0.95]]]])  # 2 classes x 1 x 4
    labels = torch.tensor([[1.0, 0.0]])  # class 1 absent: its 0.95 does not count
    # class 0 scores 0.9 (> 0.7: class id 1), 0.5 (middle: ignore), 0.2 (<= 0.25: background), 0.8
    assert cam_labels(cams, labels).tolist() == [[[1, 255, 0, 1]]]


def test_affinity_mask_by_hand():
    mask = affinity_mask(torch.tensor([[[1, 1], [0, 255]]]))
    i = 255
    expected = [[i, 1, 0, i], [1, i, 0, i], [0, 0, i, i], [i, i, i, i]]
    assert mask[0].tolist() == expected


def test_patch_token_contrast_by_hand():
    features = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 1.0, -2.0]]]])  # D=2, tokens (1,0), (1,1), (0,-2)
    mask = affinity_mask(torch.tensor([[[1, 1, 0]]]))
    units = [(1.0, 0.0), (1 / math.sqrt(2), 1 / math.sqrt(2)), (0.0, -1.0)]

    def c(a: int, b: int) -> float:
        return abs(units[a][0] * units[b][0] + units[a][1] * units[b][1])

    same = [c(0, 1), c(1, 0)]
    different = [c(0, 2), c(2, 0), c(1, 2), c(2, 1)]
    expected = 0.5 * (1 - sum(same) / (len(same) + 1)) + 0.5 * sum(different) / (len(different) + 1)
    assert float(patch_token_contrast(features, mask)) == pytest.approx(expected, rel=1e-6)


def test_class_token_contrast_by_hand():
    # One image, 3 crops (two global views, one local negative), teacher rows for the two global views.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    flags = torch.tensor([[1.0, 1.0, 0.0]])
    t = 0.5
    total = 0.0
    for row in teacher.tolist():
        e = [math.exp((row[0] * s[0] + row[1] * s[1]) / t) for s in student.tolist()]
        neg = e[2]
        total += sum(-math.log(e[j] / (e[j] + neg + 1e-4)) for j in (0, 1))  # the positives
        total += -math.log(1 / (1 + neg + 1e-4))  # the official for-else term
    expected = total / 2 / (2 + 1e-4)
    assert float(class_token_contrast(student, teacher, flags, t)) == pytest.approx(expected, rel=1e-5)


def test_local_crops_sit_on_uncertain_positions_and_flag_negatives():
    torch.manual_seed(0)
    images = torch.arange(2 * 1 * 12 * 12, dtype=torch.float32).view(2, 1, 12, 12)
    roi = torch.full((2, 12, 12), 2, dtype=torch.long)  # confident everywhere...
    roi[0, 2:6, 2:6] = 0  # ...but a background patch in image 0
    roi[1, 5:10, 5:10] = 1  # and an uncertain patch in image 1
    crops, flags, corners = local_crops(images, roi, count=3, size=4)
    assert len(crops) == 3 and crops[0].shape == (2, 1, 4, 4) and flags.shape == (2, 5)
    assert flags[:, :2].eq(1).all()  # the global views are positives
    for i in range(2):
        for j in range(3):
            y, x = corners[i, j].tolist()
            torch.testing.assert_close(crops[j][i], images[i, :, y : y + 4, x : x + 4])
            assert roi[i, y + 2, x + 2] <= 1  # centred on a not-confident position
            ratio = float(roi[i, y : y + 4, x : x + 4].sum()) / 16
            assert flags[i, j + 2] == (0.0 if ratio <= 0.2 else 1.0)


def test_momentum_update_by_hand():
    student, teacher = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    s, t = student.weight.detach().clone(), teacher.weight.detach().clone()
    momentum_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, 0.9 * t + 0.1 * s)


def test_two_training_steps_on_a_tiny_vit():
    method = create_method("toco", warmup=0.0, ctc_dims=[32, 16, 64], seg_channels=16, num_local_crops=2)
    model = VitCamClassifier(num_classes=2, backbone=VIT, weights="random")
    task, logged, initial = train_steps(method, model=model)
    for name in ("train/cls_loss", "train/cls_aux", "train/ptc", "train/ctc", "train/seg"):
        assert name in logged and math.isfinite(logged[name]), name
    for prefix in ("aux_head", "projection", "seg"):
        assert changed(task, initial, prefix), prefix
    teacher = task.method_modules["projection_teacher"]
    assert changed(task, initial, "projection_teacher")  # moved by the momentum update...
    assert all(not p.requires_grad for p in teacher.parameters())  # ...not by gradients
    cams = method.extractor(task.model, task.method_modules, scales=(1.0,))(torch.randn(3, 32, 48))
    assert cams.shape == (2, 32, 48)


def test_toco_needs_a_vit():
    model = CamClassifier(num_classes=2, backbone="test_efficientnet", weights="random")
    with pytest.raises(ValueError, match="ViT"):
        create_method("toco").build_modules(model)
