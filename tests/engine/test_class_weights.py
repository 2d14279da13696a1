"""Median frequency balancing of the segmenter's pixel loss (Eigen & Fergus 2015; SegNet on CamVid)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wsss_domains.segmentation.class_weights import (
    class_frequencies,
    median_frequency_weights,
    weights_for,
)
from wsss_domains.segmentation.task import SegmenterTask

IGNORE = 255


def test_frequencies_count_only_the_images_that_hold_the_class_and_weights_divide_their_median():
    a = torch.tensor([[0, 0, 0], [0, 1, IGNORE]])  # 5 labelled pixels: class 0 x4, class 1 x1
    b = torch.tensor([[0, 2], [2, 2]])  # 4 labelled pixels: class 0 x1, class 2 x3
    # f_c = pixels of c / labelled pixels of the images holding c; class 3 never occurs.
    f0, f1, f2 = 5 / 9, 1 / 5, 3 / 4
    frequencies = class_frequencies([a, b], num_classes=4, ignore_index=IGNORE)
    assert frequencies[3] is None
    assert frequencies[:3] == pytest.approx([f0, f1, f2])
    median = f0  # of 1/5, 5/9, 3/4
    assert median_frequency_weights(frequencies) == pytest.approx([1.0, median / f1, median / f2, 1.0])
    assert median_frequency_weights(frequencies)[1] == pytest.approx(25 / 9)  # the rare class is raised


def test_no_weighting_gives_none_and_an_unlabelled_set_or_unknown_name_is_refused():
    labels = [{"mask": torch.zeros(2, 2, dtype=torch.long)}]
    assert weights_for("none", labels, 3, IGNORE) is None
    assert weights_for("median-frequency", labels, 3, IGNORE) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no labelled pixel"):
        weights_for("median-frequency", [{"mask": torch.full((2, 2), IGNORE)}], 3, IGNORE)
    with pytest.raises(ValueError, match="unknown class weighting 'inverse'"):
        weights_for("inverse", labels, 3, IGNORE)


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_task_weights_each_pixels_loss_by_its_class_and_divides_by_the_weights_sum():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    weights = [0.5, 2.0, 1.5]
    task = SegmenterTask(FixedLogits(logits.clone()), 3, IGNORE, class_weights=weights)
    loss = task.training_step({"image": torch.zeros(1, 3, 2, 2), "mask": target}, 0)
    # -log softmax of each labelled pixel's class, weighted; the ignored pixel counts nowhere.
    terms = []
    for (y, x), c in zip(((0, 0), (0, 1), (1, 0)), (0, 1, 2), strict=True):
        column = logits[0, :, y, x]
        nll = -(column[c] - math.log(sum(math.exp(v) for v in column.tolist())))
        terms.append((weights[c] * float(nll), weights[c]))
    expected = sum(t for t, _ in terms) / sum(w for _, w in terms)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    unweighted = SegmenterTask(FixedLogits(logits.clone()), 3, IGNORE)
    plain = unweighted.training_step({"image": torch.zeros(1, 3, 2, 2), "mask": target}, 0)
    assert float(plain.detach()) != pytest.approx(expected, rel=1e-3)  # the weights change the loss
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        SegmenterTask(FixedLogits(logits), 3, IGNORE, class_weights=[1.0, 1.0])
