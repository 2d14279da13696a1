"""Category mIoU: IoU of groups of classes, computed from the class confusion matrix.

Cityscapes reports, besides the 19-class mIoU, an IoU over its 7 categories (flat, construction,
object, nature, sky, human, vehicle): a prediction of ``car`` on a ``truck`` pixel is wrong as a
class but right as a category. From a confusion matrix ``C`` (rows ground truth, columns
prediction) and the class set ``K`` of a category: ``TP = C[K, K].sum()``,
``FN = C[K, ~K].sum()``, ``FP = C[~K, K].sum()``, ``IoU = TP / (TP + FP + FN)``. The category
mIoU averages the categories that occur in the ground truth or the prediction (others are NaN),
as the official evaluation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from wsss_domains.domains.contract import LabelSpace, MetricResult

if TYPE_CHECKING:
    from torch import Tensor


def category_iou(confusion: Tensor, categories: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """IoU of each category (NaN where it is absent from both ground truth and prediction)."""
    import torch

    conf = confusion.double()
    k = conf.shape[0]
    if conf.ndim != 2 or conf.shape[1] != k:
        raise ValueError(f"confusion matrix must be square, got shape {tuple(confusion.shape)}")
    out = {}
    for name, ids in categories.items():
        inside = torch.zeros(k, dtype=torch.bool)
        inside[list(ids)] = True
        tp = conf[inside][:, inside].sum()
        fn = conf[inside][:, ~inside].sum()
        fp = conf[~inside][:, inside].sum()
        denom = float(tp + fp + fn)
        out[name] = float(tp) / denom if denom > 0 else math.nan
    return out


def category_miou(
    confusion: Tensor, label_space: LabelSpace, categories: Mapping[str, Sequence[int]]
) -> MetricResult:
    """``category_mIoU`` with the IoU of every category in ``per_class``."""
    if tuple(confusion.shape) != (label_space.num_classes, label_space.num_classes):
        raise ValueError(
            f"confusion matrix shape {tuple(confusion.shape)} does not match"
            f" {label_space.num_classes} classes"
        )
    per = category_iou(confusion, categories)
    present = [v for v in per.values() if not math.isnan(v)]
    value = sum(present) / len(present) if present else math.nan
    return MetricResult(name="category_mIoU", value=value, per_class=per)
