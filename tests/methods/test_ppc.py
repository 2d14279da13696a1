"""PPC against its defining formulas (official code: usr922/wseg, module/train.py), then training."""

from __future__ import annotations

import math

import pytest
import torch
from method_training import changed, train_steps
from torch.nn import functional as F

from wsss_domains.methods import create_method
from wsss_domains.methods.ppc import (
    HARD_END,
    contrast_scores,
    intra_view_nce,
    ppc_losses,
    prototype_nce,
    prototypes,
    pseudo_labels,
)
from wsss_domains.methods.seam import PcmCamExtractor

T = 0.1


def test_prototype_is_the_score_weighted_mean_of_the_top_pixels_normalised():
    scores = torch.tensor([[[[0.9, 0.1], [0.5, 0.2]], [[0.0, 0.3], [0.0, 0.6]]]])  # 1 x C=2 x 2 x 2
    features = torch.tensor([[[[1.0, 5.0], [0.0, 7.0]], [[0.0, 5.0], [2.0, 1.0]]]])  # D=2
    protos = prototypes(scores, features, top_share=2)  # k = 2*2 // 2 = 2 pixels per channel
    # channel 0: pixels 0 (0.9, f=[1,0]) and 2 (0.5, f=[0,2]); channel 1: pixels 3 (0.6, [7,1]), 1 (0.3, [5,5])
    p0 = [(0.9 * 1 + 0.5 * 0) / 1.4, (0.9 * 0 + 0.5 * 2) / 1.4]
    p1 = [(0.6 * 7 + 0.3 * 5) / 0.9, (0.6 * 1 + 0.3 * 5) / 0.9]

    def unit(v: list[float]) -> list[float]:
        n = math.hypot(*v)
        return [x / n for x in v]

    torch.testing.assert_close(protos, torch.tensor([unit(p0), unit(p1)]))


def test_prototypes_pool_the_whole_batch():
    scores = torch.zeros(2, 1, 4, 4)
    scores[1, 0, 2, 3] = 1.0  # the single confident pixel is in the second image
    features = torch.zeros(2, 3, 4, 4)
    features[1, :, 2, 3] = torch.tensor([0.0, 3.0, 4.0])
    torch.testing.assert_close(prototypes(scores, features), torch.tensor([[0.0, 0.6, 0.8]]))  # k = 16 // 16


def test_contrast_scores_and_pseudo_labels():
    maps = torch.tensor([[[[0.9, 0.9]], [[1.0, 3.0]], [[2.0, 0.5]]]])  # background first, 2 classes, 1x2
    labels = torch.tensor([[1.0, 1.0]])
    scores = contrast_scores(maps, labels, background=0.1)
    # class 1: min 1, max 3 -> entries within 1e-5 of the min zeroed, then (x - min - 1e-5) / (range + 1e-5)
    c1 = [(0 - 1 - 1e-5) / (2 + 1e-5), (3 - 1 - 1e-5) / (2 + 1e-5)]
    c2 = [(2 - 0.5 - 1e-5) / (1.5 + 1e-5), (0 - 0.5 - 1e-5) / (1.5 + 1e-5)]
    torch.testing.assert_close(scores[0, :, 0], torch.tensor([[0.1, 0.1], c1, c2]))
    assert pseudo_labels(scores, labels).tolist() == [2, 1]
    # An absent class scores 0 before the softmax, so the background (0.1) beats it.
    assert pseudo_labels(scores, torch.tensor([[0.0, 1.0]])).tolist() == [2, 0]


def _hand_nce(pixels: list[list[float]], protos: list[list[float]], targets: list[int]) -> float:
    total = 0.0
    for f, y in zip(pixels, targets, strict=True):
        logits = [sum(a * b for a, b in zip(f, p, strict=True)) / T for p in protos]
        total += -(logits[y] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(pixels)


def test_prototype_nce_by_hand():
    pixels = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    protos = [[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]
    targets = [0, 2, 1]
    value = prototype_nce(torch.tensor(pixels), torch.tensor(protos), torch.tensor(targets), T)
    assert float(value) == pytest.approx(_hand_nce(pixels, protos, targets), rel=1e-5)


def test_intra_view_nce_averages_over_classes_including_single_pixel_ones():
    # Class 0 has two identical pixels (so the random half does not matter), class 1 one pixel (it
    # counts in the class average but adds nothing, as in the official code).
    pixels = [[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]]
    protos = [[1.0, 0.0], [0.0, 1.0]]
    value = intra_view_nce(torch.tensor(pixels), torch.tensor(protos), torch.tensor([0, 0, 1]), T)
    expected = (_hand_nce(pixels[:1], protos, [0]) + 0.0) / 2
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_intra_view_nce_uses_hard_negatives_with_many_prototypes():
    c = HARD_END + 2
    protos = F.normalize(torch.randn(c, 8), dim=-1)
    pixel = F.normalize(protos[0] + torch.randn(8), dim=0)
    pixels = torch.stack([pixel, pixel])  # one class, two identical pixels
    value = float(intra_view_nce(pixels, protos, torch.tensor([0, 0]), T))
    logits = (pixels[0] @ protos.t() / T).tolist()
    ranked = sorted(range(c), key=lambda j: -logits[j])
    hard = ranked[3:HARD_END]  # the 4th to 13th most similar prototypes, plus the positive
    expected = math.log(math.exp(logits[0]) + sum(math.exp(logits[j]) for j in hard)) - logits[0]
    assert value == pytest.approx(expected, rel=1e-4)
    everything = math.log(sum(math.exp(v) for v in logits)) - logits[0]
    assert abs(value - everything) > 1e-2  # the hard set is not the plain softmax


def test_identical_views_make_cross_view_and_cross_label_terms_equal():
    maps = torch.rand(2, 3, 4, 4)
    features = torch.rand(2, 5, 4, 4)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    losses = ppc_losses(maps, maps, features, features, labels, gamma=0.1)
    assert set(losses) == {"ppc_cross_view", "ppc_cross_label", "ppc_intra_view"}
    assert float(losses["ppc_cross_view"]) == pytest.approx(float(losses["ppc_cross_label"]), rel=1e-6)
    scores = contrast_scores(maps, labels)
    f = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, 5), dim=-1)
    expected = 0.1 * prototype_nce(f, prototypes(scores, features), pseudo_labels(scores, labels))
    assert float(losses["ppc_cross_view"]) == pytest.approx(float(expected), rel=1e-5)


def test_two_training_steps_train_the_projection_head():
    method = create_method("ppc")
    task, logged, initial = train_steps(method)
    for name in (
        "train/er",
        "train/ecr",
        "train/ppc_cross_view",
        "train/ppc_cross_label",
        "train/ppc_intra_view",
    ):
        assert name in logged and math.isfinite(logged[name]), name
    assert changed(task, initial, "projection") and changed(task, initial, "pcm")
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0,))
    assert isinstance(extractor, PcmCamExtractor)
    assert extractor(torch.randn(3, 32, 40)).shape == (2, 32, 40)
