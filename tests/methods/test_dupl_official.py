"""DuPL's threshold schedule and consistency loss against transcriptions of Wu0409/DuPL.

Each reference below is written from the official code (``utils/train_helper.py::cosine_descent``,
``train_final_voc.py`` lines 162-166, 263-275 and 404-436, ``model/model_dupl.py`` ``need_sp``,
``utils/randomaug.py`` and ``utils/imutils.py::augment_data_strong``) in plain torch / numpy / PIL,
without calling the project's formulas, so a change to the project's formula fails here.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.nn import functional as F

from wsss_domains.methods import create_method
from wsss_domains.methods.dupl import (
    RANDAUG_LIST,
    align_augmented,
    apply_randaugment_op,
    consistency_loss,
    cosine_descent,
    randaugment_value,
    strong_augment,
)
from wsss_domains.methods.online_labels import refined_labels
from wsss_domains.refine.par import PixelAdaptiveRefiner

# train_final_voc.py lines 162-166.
OFFICIAL_START = [0.7] * 20
OFFICIAL_TARGET = [
    0.70, 0.70, 0.70, 0.70, 0.55, 0.55, 0.55, 0.55, 0.70, 0.55,
    0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.70, 0.55,
]  # fmt: skip
VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def official_cosine_descent(max_thres, min_thres, step, num_steps):
    # utils/train_helper.py, verbatim.
    if step < 0:
        return max_thres
    if step >= num_steps:
        return min_thres
    interpolation_factor = step / (num_steps - 1)
    weight = max_thres + (min_thres - max_thres) * (1 - np.cos(np.pi * interpolation_factor)) / 2
    return weight


def official_image_thresholds(n_iter, cls_label, cam_iters=2000, max_iters=20000):
    # train_final_voc.py lines 263-274.
    high_thres_start = torch.ones(20, dtype=torch.float64) * 0.7
    high_thres_target = torch.tensor(OFFICIAL_TARGET, dtype=torch.float64)
    high_thres = official_cosine_descent(
        high_thres_start, high_thres_target, n_iter - cam_iters, max_iters - cam_iters
    )
    out = []
    for i in range(cls_label.shape[0]):
        out.append(torch.max(high_thres[torch.nonzero(cls_label[i]).squeeze(-1)]))
    return torch.stack(out)


@pytest.mark.parametrize("step", [-3, 0, 1, 2500, 8999, 9000, 15000, 17998, 17999, 18000, 25000])
def test_cosine_descent_matches_the_official_function(step):
    num_steps = 18000
    start, target = torch.tensor(OFFICIAL_START), torch.tensor(OFFICIAL_TARGET)
    expected = official_cosine_descent(start.numpy(), target.numpy(), step, num_steps)
    got = cosine_descent(start, target, step / (num_steps - 1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-6)


def _voc_domain():
    space = SimpleNamespace(classes=("background", *VOC_NAMES), foreground=tuple(range(1, 21)))
    spec = SimpleNamespace(label_space=space, label_space_from=None)
    return SimpleNamespace(datasets=lambda: {"voc2012": spec})


@pytest.mark.parametrize("progress", [0.1, 0.2, 0.37, 0.55, 0.8, 0.99, 1.0])
def test_per_image_thresholds_follow_the_official_schedule_on_voc(progress):
    pairs = torch.zeros(3, 20)
    pairs[0, [0, 5]] = 1  # aeroplane (0.70) and bus (0.55): the image takes the max, 0.70
    pairs[1, [6, 14]] = 1  # car and person: 0.55 targets
    pairs[2, [7, 11, 16]] = 1
    labels = torch.cat([torch.eye(20), pairs])  # every class alone, then mixtures
    method = create_method("dupl")
    method.domain = _voc_domain()  # the engine's setup(); VOC's classes give the official targets
    got = method.high_thresholds(labels, progress)
    n_iter = round(progress * 20000)
    expected = official_image_thresholds(n_iter, labels)
    # The project uses the share of the post-warm-up phase, (n - 2000) / 18000; the official divides
    # by 17999: at most ~1e-5 apart.
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_threshold_targets_outside_voc_and_the_fixed_option():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    method = create_method("dupl")  # no VOC classes: 0.55 for every class (train_final_coco.py)
    np.testing.assert_allclose(method.high_thresholds(labels, 1.0).numpy(), [0.55, 0.55], atol=1e-7)
    t = (0.4 - 0.1) / 0.9
    mid = 0.7 + (0.55 - 0.7) * (1 - np.cos(np.pi * t)) / 2
    np.testing.assert_allclose(method.high_thresholds(labels, 0.4).numpy(), [mid, mid], atol=1e-6)
    custom = create_method("dupl", class_high_targets=[0.6, 0.5, 0.4])
    np.testing.assert_allclose(custom.high_thresholds(labels, 1.0).numpy(), [0.6, 0.5], atol=1e-7)
    fixed = create_method("dupl", threshold_schedule="fixed")
    np.testing.assert_allclose(fixed.high_thresholds(labels, 1.0).numpy(), [0.7, 0.7], atol=1e-7)
    with pytest.raises(ValueError):
        create_method("dupl", class_high_targets=[0.2])  # below the low threshold


def test_refined_labels_take_one_high_threshold_per_image():
    # refine_cams_with_dynamic_thres: the high background map is constant per image.
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=gen)
    cams = torch.rand(2, 2, 16, 16, generator=gen)
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    par = PixelAdaptiveRefiner(downscale=2)
    got = refined_labels(images, cams, labels, par, torch.tensor([0.6, 0.45]), 0.25)
    for i, high in enumerate((0.6, 0.45)):
        one = refined_labels(images[i : i + 1], cams[i : i + 1], labels[i : i + 1], par, high, 0.25)
        assert torch.equal(got[i], one[0])


def official_consistency(segs_1, segs_1_aug, refined_pseudo_label_2, size, ignore_index=255):
    # train_final_voc.py lines 407-434 (branch 1), verbatim up to variable names.
    ce_criterion = torch.nn.CrossEntropyLoss(ignore_index=ignore_index, reduction="none")
    segs_1_aug = torch.flip(segs_1_aug, dims=[3])
    segs_1_aug = F.interpolate(segs_1_aug, size=size, mode="bilinear", align_corners=False)
    pseudo_seg_1 = segs_1.detach().data.max(1)[1]
    confidence_map_1 = torch.softmax(segs_1.detach(), dim=1).max(1)[0]
    uncertain_mask_1 = (refined_pseudo_label_2 == ignore_index).bool() & (confidence_map_1 > 0.9)
    pseudo_seg_1[~uncertain_mask_1] = ignore_index
    reg_loss_1 = segs_1.sum() * 0.0
    if uncertain_mask_1.sum() > 0:
        reg_loss_1 = (ce_criterion(segs_1_aug, pseudo_seg_1)).sum() / uncertain_mask_1.sum()
    return reg_loss_1


def test_consistency_loss_matches_the_official_formula():
    gen = torch.Generator().manual_seed(0)
    size = (16, 20)
    segs = 4 * torch.randn(2, 3, *size, generator=gen)  # clean logits: many pixels above 0.9
    segs_aug = torch.randn(2, 3, 12, 15, generator=gen)  # the 0.75-scale view's logits
    target = torch.randint(0, 3, (2, *size), generator=gen)
    target[torch.rand(2, *size, generator=gen) < 0.5] = 255
    expected = official_consistency(segs, segs_aug, target, size)
    got = consistency_loss(align_augmented(segs_aug, size), segs, target)
    assert float(expected) > 0
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    # No ignored pixel: zero, as the official seg_loss * 0.0.
    assert float(consistency_loss(align_augmented(segs_aug, size), segs, target.clamp_max(2))) == 0.0


def test_randaugment_values_follow_the_official_list():
    # utils/randomaug.py augment_list() and RandAugment.__call__ at m = 10.
    official = [
        ("autocontrast", 0, 1), ("equalize", 0, 1), ("posterize", 0, 6), ("color", 0.1, 1.9),
        ("contrast", 0.1, 1.9), ("brightness", 0.1, 1.9), ("sharpness", 0.1, 1.9),
    ]  # fmt: skip
    assert [op for op, _, _ in RANDAUG_LIST] == [op for op, _, _ in official]
    for (op, lo, hi), (_, a, b) in zip(RANDAUG_LIST, official, strict=True):
        assert randaugment_value(lo, hi, 10) == (float(10) / 30) * float(b - a) + a, op
    assert int(randaugment_value(0.0, 6.0, 10)) == 2  # Posterize keeps 2 bits


PIL_OPS = {  # utils/randomaug.py
    "autocontrast": lambda img, _: ImageOps.autocontrast(img),
    "equalize": lambda img, _: ImageOps.equalize(img),
    "posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    "color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
}


def _test_image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    h, w = 48, 64
    ramp = torch.linspace(0, 1, w).view(1, 1, w).expand(3, h, w) * torch.tensor([0.8, 0.5, 0.3]).view(3, 1, 1)
    return ((ramp + 0.1 + 0.15 * torch.rand(3, h, w, generator=gen)).clamp(0, 1) * 255).to(torch.uint8)


@pytest.mark.parametrize("op", [op for op, _, _ in RANDAUG_LIST])
def test_randaugment_ops_match_pil(op):
    image = _test_image()
    lo, hi = next((a, b) for name, a, b in RANDAUG_LIST if name == op)
    value = (float(10) / 30) * float(hi - lo) + lo
    expected = np.array(PIL_OPS[op](Image.fromarray(image.permute(1, 2, 0).numpy()), value))
    got = apply_randaugment_op(image, op, value).permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # Color/Contrast round differently


def test_strong_augment_renormalises_and_mirrors():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = _test_image().float() / 255
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    normalised = ((pixels - m) / s)[None]
    same = strong_augment(normalised, mean, std, n=0)  # no operation: mirror only (augment_data_strong)
    torch.testing.assert_close(same, normalised.flip(-1), atol=1e-5, rtol=0)
    posterised = strong_augment(normalised, mean, std, n=3, generator=torch.Generator().manual_seed(0))
    assert posterised.shape == normalised.shape and not torch.allclose(posterised, same)
