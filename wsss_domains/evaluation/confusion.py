"""Confusion-matrix accumulation over a whole evaluation set.

Scores such as mIoU must be computed from pixel counts summed over every image, not averaged
per image, so evaluation accumulates one confusion matrix and derives every score from it at the
end. The accumulator is a :class:`torchmetrics.Metric`, so under DDP the counts of every process
are summed before ``compute()``.

Predictions may hold ``ignore_index`` on a scored pixel (a pseudo-label that left a pixel
unassigned). Such a pixel is still a miss for its ground-truth class, so it is counted in an extra
"unassigned" column rather than dropped; :meth:`ConfusionMatrix.compute` returns the square
class-by-class part and :meth:`ConfusionMatrix.compute_unassigned` the extra column.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix

from wsss_domains.domains.contract import IGNORE_INDEX


class ConfusionMatrix(Metric):
    """Pixel counts of (ground-truth class, predicted class) over classes ``0..num_classes-1``.

    Rows are ground truth, columns prediction. Pixels whose target is ``ignore_index`` or whose
    ``exclude`` flag is True are not scored.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        # No result cache: compute() is cheap and a cache goes stale after merge_state().
        super().__init__(compute_with_cache=False)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with class ids 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # The last column counts scored pixels predicted as ignore_index ("unassigned").
        self.add_state(
            "confmat", torch.zeros(num_classes, num_classes + 1, dtype=torch.long), dist_reduce_fx="sum"
        )
        # The ``C x (C + 1)`` counts the last update added (same layout as ``confmat``).
        self.last_counts: Tensor = torch.zeros(num_classes, num_classes + 1, dtype=torch.long)

    def update(self, pred: Tensor, target: Tensor, exclude: Tensor | None = None) -> None:
        """Add the pixels of one prediction/target pair (any matching shape, e.g. ``HxW``)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}"
            )
        scored = target != self.ignore_index
        if exclude is not None:
            if exclude.shape != target.shape:
                raise ValueError(
                    f"exclude shape {tuple(exclude.shape)} differs from target {tuple(target.shape)}"
                )
            scored &= ~exclude.bool()
        gt = target[scored].long()
        pr = pred[scored].long()
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.num_classes):
            bad = int(gt[(gt < 0) | (gt >= self.num_classes)][0])
            raise ValueError(f"target holds class id {bad}, outside 0..{self.num_classes - 1}")
        unassigned = pr == self.ignore_index
        invalid = ((pr < 0) | (pr >= self.num_classes)) & ~unassigned
        if invalid.any():
            bad = int(pr[invalid][0])
            raise ValueError(
                f"prediction holds class id {bad}, outside 0..{self.num_classes - 1}"
                f" and not the ignore index {self.ignore_index}"
            )
        pr = torch.where(unassigned, torch.full_like(pr, self.num_classes), pr)
        counts = multiclass_confusion_matrix(pr, gt, num_classes=self.num_classes + 1, validate_args=False)
        counts = counts[: self.num_classes].to(self.confmat)
        self.confmat += counts
        # Kept so a caller updating image by image can score that image without counting it twice.
        self.last_counts = counts

    def compute(self) -> Tensor:
        """The ``CxC`` int64 matrix, rows ground truth, columns prediction."""
        return self.confmat[:, : self.num_classes].clone()

    def compute_unassigned(self) -> Tensor:
        """Per ground-truth class, the scored pixels predicted as ``ignore_index`` (int64, ``C``)."""
        with self.sync_context():
            return self.confmat[:, self.num_classes].clone()
