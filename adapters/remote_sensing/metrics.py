"""Overall accuracy and Cohen's kappa, the agreement scores remote-sensing benchmarks report.

From a confusion matrix ``C`` (rows ground truth, columns prediction) over ``N = sum(C)``
scored pixels: ``OA = trace(C) / N``; with ``p_o = OA`` and chance agreement
``p_e = sum_k rowsum_k * colsum_k / N^2``, ``kappa = (p_o - p_e) / (1 - p_e)``. Kappa discounts
the agreement a map gets for free from class frequencies, which OA alone hides on imbalanced
land cover. A ``K x (K+1)`` matrix (an extra column of pixels the prediction left unassigned)
counts those pixels as wrong.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from wsss_domains.domains.contract import LabelSpace, MetricResult

if TYPE_CHECKING:
    from torch import Tensor


def _square(confusion: Tensor) -> Tensor:
    import torch

    conf = confusion.double()
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be KxK or Kx(K+1), got shape {tuple(confusion.shape)}")
    if conf.shape[1] == conf.shape[0] + 1:
        conf = torch.cat([conf, conf.new_zeros(1, conf.shape[1])])
    return conf


def overall_accuracy(confusion: Tensor) -> float:
    """Fraction of scored pixels predicted correctly (NaN when nothing was scored)."""
    conf = _square(confusion)
    total = float(conf.sum())
    return float(conf.trace()) / total if total > 0 else math.nan


def cohen_kappa(confusion: Tensor) -> float:
    """Cohen's kappa (NaN when nothing was scored or chance agreement is already perfect)."""
    conf = _square(confusion)
    total = float(conf.sum())
    if total <= 0:
        return math.nan
    p_o = float(conf.trace()) / total
    p_e = float((conf.sum(dim=1) * conf.sum(dim=0)).sum()) / total**2
    return (p_o - p_e) / (1.0 - p_e) if p_e < 1.0 else math.nan


def agreement_metrics(confusion: Tensor, label_space: LabelSpace) -> list[MetricResult]:
    """``overall_accuracy`` and ``kappa`` over every class of ``label_space``."""
    k = label_space.num_classes
    if confusion.shape[0] != k:
        raise ValueError(f"confusion matrix has {confusion.shape[0]} rows for {k} classes")
    return [
        MetricResult(name="overall_accuracy", value=overall_accuracy(confusion)),
        MetricResult(name="kappa", value=cohen_kappa(confusion)),
    ]
