"""Segmentation scores derived from an accumulated confusion matrix.

Which classes count
-------------------
Only the *scored* classes (``DomainPlugin.scored_classes``) enter the averages and the pixel
totals; a domain may leave out, say, a catch-all class. Among the scored classes:

* **Per-class IoU** ``TP / (TP + FP + FN)`` is reported for every scored class. A class absent
  from the ground truth of the whole evaluated set *and* never predicted has no defined IoU: it is
  NaN (``null`` in JSON). A class absent from the ground truth but predicted somewhere has IoU 0.
* **mIoU** averages the per-class IoU over the scored classes whose IoU is defined, i.e. those
  present in the ground truth plus those falsely predicted (which count with 0). Undefined (NaN)
  classes are left out rather than counted as 0 or 1.
* **Per-class Dice** ``2 TP / (2 TP + FP + FN)`` and **mean Dice** follow the same convention.
* **Pixel accuracy** is the fraction of scored ground-truth pixels predicted correctly.
* **Mean accuracy** averages per-class recall ``TP / (TP + FN)`` over the scored classes present in
  the ground truth (recall of an absent class is undefined).
* **FwIoU** weights each scored class's IoU by its share of the scored ground-truth pixels.

False positives of a scored class include pixels whose ground truth is an unscored class. Scored
pixels predicted as the ignore index ("unassigned") are misses (false negatives) of their
ground-truth class and lower pixel accuracy; they are nobody's false positive.

The papers' convention
----------------------
WSSS papers score pseudo-labels with the official code of ToCo (``utils/evaluate.py``,
``pseudo_scores``) and CLIP-ES, which differs in two ways: pixels a pseudo-label leaves unassigned
are dropped rather than counted as misses, and mIoU averages only the classes present in the
ground truth (a class predicted where it never occurs adds no 0). :func:`paper_miou` computes it,
so figures can be set beside published ones. It reads higher for pseudo-labels that leave many
pixels unassigned, which is why the project's own mIoU counts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Scores:
    """Every score of one evaluation; per-class tensors cover all classes (NaN where undefined)."""

    iou: Tensor
    dice: Tensor
    accuracy: Tensor
    miou: float
    fwiou: float
    pixel_accuracy: float
    mean_accuracy: float
    mean_dice: float


def _counts(confusion: Tensor, unassigned: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """True positives, ground-truth totals and prediction totals per class, as float64."""
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {tuple(confusion.shape)}")
    cm = confusion.to(torch.float64)
    gt = cm.sum(dim=1)
    if unassigned is not None:
        if unassigned.shape != (cm.shape[0],):
            raise ValueError(
                f"unassigned counts must have shape ({cm.shape[0]},), got {tuple(unassigned.shape)}"
            )
        gt = gt + unassigned.to(torch.float64)
    return cm.diagonal(), gt, cm.sum(dim=0)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with NaN where ``den`` is 0 (the score is undefined, not 0)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan))


def per_class_iou(confusion: Tensor, unassigned: Tensor | None = None) -> Tensor:
    """IoU of every class (float64), NaN for a class neither in the ground truth nor predicted."""
    tp, gt, pred = _counts(confusion, unassigned)
    return _ratio(tp, gt + pred - tp)


def per_class_dice(confusion: Tensor, unassigned: Tensor | None = None) -> Tensor:
    """Dice (F1) of every class (float64), NaN for a class neither in the ground truth nor predicted."""
    tp, gt, pred = _counts(confusion, unassigned)
    return _ratio(2 * tp, gt + pred)


def per_class_accuracy(confusion: Tensor, unassigned: Tensor | None = None) -> Tensor:
    """Recall of every class (float64), NaN for a class absent from the ground truth."""
    tp, gt, _ = _counts(confusion, unassigned)
    return _ratio(tp, gt)


def _nanmean(values: Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan


def paper_miou(confusion: Tensor, scored: Sequence[int]) -> float:
    """mIoU as ToCo's ``pseudo_scores`` computes it: unassigned pixels dropped (``confusion`` is the
    class-by-class part only), averaged over the ``scored`` classes present in the ground truth."""
    cm = confusion.to(torch.float64)
    tp, gt, pred = cm.diagonal(), cm.sum(dim=1), cm.sum(dim=0)
    index = [c for c in scored if gt[c] > 0]
    if not index:
        return math.nan
    iou = tp[index] / (gt[index] + pred[index] - tp[index])
    return float(iou.mean())


def compute_scores(confusion: Tensor, scored: Sequence[int], unassigned: Tensor | None = None) -> Scores:
    """All scores from a ``CxC`` confusion matrix (rows gt), averaged over the ``scored`` class ids.

    ``unassigned`` holds, per ground-truth class, the scored pixels predicted as the ignore index.
    """
    num_classes = confusion.shape[0]
    index = list(scored)
    if not index:
        raise ValueError("no scored classes")
    if len(set(index)) != len(index) or not all(0 <= c < num_classes for c in index):
        raise ValueError(f"scored classes {index} must be distinct ids in 0..{num_classes - 1}")
    tp, gt, _ = _counts(confusion, unassigned)
    iou = per_class_iou(confusion, unassigned)
    dice = per_class_dice(confusion, unassigned)
    accuracy = per_class_accuracy(confusion, unassigned)
    gt_scored = gt[index]
    total = float(gt_scored.sum())
    if total > 0:
        weights = gt_scored / total
        fwiou = float((weights * iou[index].nan_to_num(0.0)).sum())
        pixel_accuracy = float(tp[index].sum()) / total
    else:
        fwiou = pixel_accuracy = math.nan
    return Scores(
        iou=iou,
        dice=dice,
        accuracy=accuracy,
        miou=_nanmean(iou[index]),
        fwiou=fwiou,
        pixel_accuracy=pixel_accuracy,
        mean_accuracy=_nanmean(accuracy[index]),
        mean_dice=_nanmean(dice[index]),
    )
