"""SEPL's merge against a transcription of the official one (SAM_WSSS ``merge/max_iou_imp2.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_domains.sam.sepl_merge import sepl_assign, sepl_refine

U = 255


def official_merge(predict: np.ndarray, masks: list[np.ndarray], num_cls: int) -> np.ndarray:
    """``MaxIoU_IMP2.merge`` (github.com/cskyl/SAM_WSSS, merge/max_iou_imp2.py), line by line.

    Only the I/O differs: masks come as a list (the official scans ``sam_folder``, each mask a PNG
    of 255s) and ``seen`` holds list positions instead of paths. Class 0 is background.
    """
    seen = []
    processed_mask = np.zeros_like(predict)
    for i in range(1, num_cls):
        pre_cls = predict == i
        if np.sum(pre_cls) == 0:
            continue
        candidates = []
        sam_mask = np.zeros_like(pre_cls)
        for k, cur_sam in enumerate(masks):
            if k not in seen:
                sam_mask = np.logical_or(sam_mask, cur_sam)
                improve_thresh = 2 * np.sum((pre_cls == cur_sam) * pre_cls) - np.sum(cur_sam)
                improve_pred_thresh = np.sum((pre_cls == cur_sam) * pre_cls) / np.sum(pre_cls)
                if improve_thresh > 0 or improve_pred_thresh >= 0.85:
                    candidates.append(cur_sam)
                    seen.append(k)
        cam_mask = np.logical_and(sam_mask == 0, pre_cls == 1)
        candidates.append(cam_mask)
        processed_mask[np.sum(candidates, axis=0) > 0] = i
    return processed_mask


def official_claims(predict: np.ndarray, masks: list[np.ndarray], num_cls: int) -> list[int]:
    """Which class's ``candidates`` each mask joined in the loop above (-1: none)."""
    owner = [-1] * len(masks)
    for i in range(1, num_cls):
        pre_cls = predict == i
        if np.sum(pre_cls) == 0:
            continue
        for k, cur_sam in enumerate(masks):
            if owner[k] < 0:
                inside = np.sum(pre_cls & cur_sam)
                if 2 * inside - np.sum(cur_sam) > 0 or inside / np.sum(pre_cls) >= 0.85:
                    owner[k] = i
    return owner


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """Union of (y0, y1, x0, x1) rectangles."""
    m = torch.zeros(shape, dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def random_case(seed: int, size: int = 24, num_cls: int = 5, n_masks: int = 12):
    """A blocky pseudo-label (rectangles of classes 1..num_cls-1 on background) and rectangle masks."""
    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), dtype=np.int64)
    for c in rng.permutation(np.arange(1, num_cls)):
        y, x = rng.integers(0, size - 4, 2)
        h, w = rng.integers(3, size // 2, 2)
        label[y : y + h, x : x + w] = c
    masks = []
    for _ in range(n_masks):
        y, x = rng.integers(0, size - 2, 2)
        h, w = rng.integers(2, size, 2)
        m = np.zeros((size, size), dtype=bool)
        m[y : y + h, x : x + w] = True
        masks.append(m)
    return label, masks


@pytest.mark.parametrize("seed", range(40))
def test_merge_matches_the_official_max_iou_imp2(seed):
    label, masks = random_case(seed)
    expected = official_merge(label, masks, 5)
    out = sepl_refine(torch.from_numpy(label), torch.from_numpy(np.stack(masks)), 5, background_index=0)
    assert np.array_equal(out.numpy(), expected)
    claims = sepl_assign(torch.from_numpy(label), torch.from_numpy(np.stack(masks)), 5, background_index=0)
    assert claims.tolist() == official_claims(label, masks, 5)


def test_the_random_cases_exercise_every_branch_of_the_official_merge():
    """Rejected masks, claims by coverage alone, masks two classes could claim, overwritten classes."""
    rejected = coverage_only = contested = overwritten = 0
    for seed in range(40):
        label, masks = random_case(seed)
        merged = official_merge(label, masks, 5)
        for m in masks:
            inside = [int((m & (label == c)).sum()) for c in range(1, 5)]
            areas = [int((label == c).sum()) for c in range(1, 5)]
            major = [2 * v > m.sum() for v in inside]
            cover = [a > 0 and v / a >= 0.85 for v, a in zip(inside, areas, strict=True)]
            passing = [a or b for a, b in zip(major, cover, strict=True)]
            rejected += not any(passing)
            coverage_only += any(cover) and not any(major)
            contested += sum(passing) > 1
        overwritten += int(((label > 0) & (merged > 0) & (merged < label)).sum() > 0)
    assert min(rejected, coverage_only, contested, overwritten) > 0


def test_rejected_masks_fall_to_background_and_later_classes_win_overlaps():
    """Two rules the former nearest-mask merge broke, on one 8 x 8 image.

    * a mask no class claims turns its class pixels to background (official: output starts at 0);
    * where masks of two classes overlap, the later class wins, whatever the masks' sizes.
    """
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[0:4, 0:4] = 1  # 16 px
    label[4:8, 4:8] = 2  # 16 px
    straddle = _mask((8, 8), (2, 6, 2, 6))  # 4 px of each class, 8 of background: nobody's
    claimed_by_1 = _mask((8, 8), (0, 4, 0, 6))  # 16 / 24 class 1 -> class 1
    large_2 = _mask((8, 8), (3, 8, 3, 8))  # 16 / 25 class 2 -> class 2, overlaps claimed_by_1
    masks = torch.stack([straddle, claimed_by_1, large_2])
    assert sepl_assign(label, masks, 3, background_index=0).tolist() == [-1, 1, 2]
    out = sepl_refine(label, masks, 3, background_index=0)
    expected = torch.zeros(8, 8, dtype=torch.int64)
    expected[claimed_by_1] = 1
    expected[large_2] = 2  # class 2 paints over class 1 on (3, 3..5); the larger mask wins
    assert torch.equal(out, expected)
    assert torch.equal(out, torch.from_numpy(official_merge(label.numpy(), list(masks.numpy()), 3)))
    # Only the rejected mask: class pixels under it become background, the rest stays CAM.
    alone = sepl_refine(label, straddle[None], 3, background_index=0)
    assert torch.equal(alone, torch.where(straddle, 0, label))


def test_a_mask_claimed_by_an_earlier_class_does_not_hide_later_cam_pixels():
    """Official ``seen``: class 2's ``sam_mask`` leaves out masks class 1 claimed, so its CAM pixels
    under such a mask are kept ("trust CAM if SAM has no prediction")."""
    label = torch.zeros(4, 8, dtype=torch.int64)
    label[:, 0:4] = 1  # 16 px
    label[0:2, 4:6] = 2  # 4 px
    wide = _mask((4, 8), (0, 4, 0, 6))  # 16 / 24 class 1: class 1 (it covers all of class 2 too)
    assert sepl_assign(label, wide[None], 3, background_index=0).tolist() == [1]
    out = sepl_refine(label, wide[None], 3, background_index=0)
    expected = torch.where(wide, 1, 0)
    expected[label == 2] = 2
    assert torch.equal(out, expected)
    assert torch.equal(out, torch.from_numpy(official_merge(label.numpy(), [wide.numpy()], 3)))


def test_coverage_threshold_is_inclusive_at_85_percent():
    label = torch.zeros(4, 40, dtype=torch.int64)
    label[0, :20] = 2  # 20 px
    label[3, :10] = 1  # 10 px
    # 17 px of class 2 (85 %), 17 of class 0, 4 of class 1: no class holds more than half of it.
    at = _mask((4, 40), (0, 1, 0, 17), (1, 2, 0, 17), (3, 4, 0, 4))
    below = _mask((4, 40), (0, 1, 0, 16), (1, 2, 0, 16), (3, 4, 0, 4))  # 80 %
    assert sepl_assign(label, torch.stack([at, below]), 3, background_index=0).tolist() == [2, -1]


def test_background_index_other_than_zero_and_no_background():
    label = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 2, 2], [2, 2, 2, 2]])
    masks = torch.stack([_mask((4, 4), (0, 2, 0, 4)), _mask((4, 4), (0, 4, 0, 2))])
    # Background is class 1: mask 0 (4 px bg, all 4 px of class 0) goes to class 0 by coverage;
    # mask 1 (4 px bg, 4 of the 8 px of class 2) to nobody, so class 2 keeps only what it is not under.
    out = sepl_refine(label, masks, 3, background_index=1)
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2]])
    assert torch.equal(out, expected)
    # Without a background class class 1 claims mask 1 by coverage; class 2 then keeps its CAM
    # pixels under it (mask 1 is seen), and class 1 paints over class 0 on mask 0's left half.
    assert sepl_assign(label, masks, 3).tolist() == [0, 1]
    assert torch.equal(sepl_refine(label, masks, 3), label)
    # Pixels no class paints are ignored.
    rejected = sepl_refine(label, _mask((4, 4), (1, 3, 0, 4))[None], 3)  # 2 px each of 0 and 1, 4 of 2
    assert sepl_assign(label, _mask((4, 4), (1, 3, 0, 4))[None], 3).tolist() == [-1]
    assert rejected[1].tolist() == [U] * 4 and rejected[2].tolist() == [U] * 4


def test_ignored_pixels_stay_ignored_unless_asked():
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[2:6, 2:6] = 1
    label[0, 0] = U
    whole = torch.ones(8, 8, dtype=torch.bool)  # 16 / 64 class 1, covers all of it: class 1
    out = sepl_refine(label, whole[None], 2, background_index=0)
    expected = torch.ones(8, 8, dtype=torch.int64)
    expected[0, 0] = U
    assert torch.equal(out, expected)
    filled = sepl_refine(label, whole[None], 2, background_index=0, keep_ignore=False)
    assert int(filled[0, 0]) == 1  # as the official merge paints any pixel of a claimed mask
    assert torch.equal(
        sepl_refine(label, torch.zeros(0, 8, 8, dtype=torch.bool), 2, background_index=0), label
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match="same size"):
        sepl_refine(torch.zeros(4, 4, dtype=torch.int64), torch.zeros(1, 5, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        sepl_refine(torch.full((2, 2), 3), torch.ones(1, 2, 2, dtype=torch.bool), 2)
