"""SEPL's rules on hand-made pseudo-labels and masks."""

from __future__ import annotations

import pytest
import torch

from wsss_domains.sam.sepl import sepl_assign, sepl_refine

U = 255


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """Union of (y0, y1, x0, x1) rectangles."""
    m = torch.zeros(shape, dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_majority_rule():
    label = torch.zeros(10, 10, dtype=torch.int64)
    label[:, 5:] = 1  # class 1 = right half, 50 px
    inside = _mask((10, 10), (0, 10, 3, 10))  # 70 px, 50 in class 1 (> half), 20 in class 0
    half = _mask((10, 10), (0, 2, 3, 7))  # 8 px: 4 in class 0, 4 in class 1, neither > half
    assert sepl_assign(label, torch.stack([inside, half]), 2).tolist() == [1, -1]
    out = sepl_refine(label, inside[None], 2)
    assert bool((out[inside] == 1).all()) and bool((out[~inside] == label[~inside]).all())


def test_coverage_rule_claims_a_mask_mostly_outside_the_class():
    label = torch.zeros(20, 20, dtype=torch.int64)
    label[8:12, 8:12] = 2  # a 16 px CAM blob inside a bigger object
    big = _mask((20, 20), (4, 16, 4, 16))  # 144 px: only 16 / 144 in class 2, but all of class 2
    most = _mask((20, 20), (4, 16, 4, 11))  # covers 12 / 16 = 75 % of class 2: not enough
    # With class 0 as background, covering class 2 beats the background majority ...
    assert sepl_assign(label, torch.stack([big, most]), 3, background_index=0).tolist() == [2, 0]
    out = sepl_refine(label, big[None], 3, background_index=0)
    assert bool((out[big] == 2).all()) and bool((out[~big] == 0).all())
    # ... while a majority of a real class (no background in the label space) keeps the mask.
    assert sepl_assign(label, big[None], 3).tolist() == [0]


def test_coverage_threshold_is_inclusive_at_85_percent():
    label = torch.zeros(4, 40, dtype=torch.int64)
    label[0, :20] = 2  # 20 px
    label[3, :10] = 1  # 10 px
    # 17 px of class 2 (85 %), 17 of class 0, 4 of class 1: no class holds more than half of it.
    at = _mask((4, 40), (0, 1, 0, 17), (1, 2, 0, 17), (3, 4, 0, 4))
    below = _mask((4, 40), (0, 1, 0, 16), (1, 2, 0, 16), (3, 4, 0, 4))  # 80 %
    assert sepl_assign(label, torch.stack([at, below]), 3).tolist() == [2, -1]


def test_uncovered_pixels_keep_their_labels_and_unassigned_masks_change_nothing():
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [U, U, 2, 2]])
    straddle = _mask((4, 4), (0, 2, 1, 3))  # 2 px class 0, 2 px class 1, no class region covered
    assert sepl_assign(label, straddle[None], 3).tolist() == [-1]
    assert torch.equal(sepl_refine(label, straddle[None], 3), label)
    assert torch.equal(sepl_refine(label, torch.zeros(0, 4, 4, dtype=torch.bool), 3), label)


def test_smaller_mask_wins_where_masks_overlap_and_ignore_is_kept():
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[2:6, 2:6] = 1
    label[0, 0] = U
    background = torch.ones(8, 8, dtype=torch.bool)  # 48 / 64 in class 0 -> class 0
    object_ = _mask((8, 8), (1, 7, 1, 7))  # covers all of class 1 (16 / 36 inside) -> class 1
    out = sepl_refine(label, torch.stack([object_, background]), 2, background_index=0)
    expected = torch.zeros(8, 8, dtype=torch.int64)
    expected[1:7, 1:7] = 1
    expected[0, 0] = U
    assert torch.equal(out, expected)
    filled = sepl_refine(label, torch.stack([object_, background]), 2, background_index=0, keep_ignore=False)
    assert int(filled[0, 0]) == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="same size"):
        sepl_refine(torch.zeros(4, 4, dtype=torch.int64), torch.zeros(1, 5, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        sepl_refine(torch.full((2, 2), 3), torch.ones(1, 2, 2, dtype=torch.bool), 2)
