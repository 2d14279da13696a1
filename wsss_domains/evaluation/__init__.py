"""Evaluation: confusion-matrix accumulation, segmentation scores and reports."""

from wsss_domains.evaluation.confusion import ConfusionMatrix
from wsss_domains.evaluation.evaluate import evaluate_predictions, pred_filename
from wsss_domains.evaluation.report import EvaluationReport
from wsss_domains.evaluation.scores import (
    Scores,
    compute_scores,
    per_class_accuracy,
    per_class_dice,
    per_class_iou,
)

__all__ = [
    "ConfusionMatrix",
    "EvaluationReport",
    "Scores",
    "compute_scores",
    "evaluate_predictions",
    "per_class_accuracy",
    "per_class_dice",
    "per_class_iou",
    "pred_filename",
]
