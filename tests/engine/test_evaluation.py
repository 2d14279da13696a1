"""Evaluation: confusion accumulation, scores against hand-computed values, reports, evaluate."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from wsss_domains.data.io import DataError, save_palette_png
from wsss_domains.domains.contract import IGNORE_INDEX, DatasetSpec, DomainPlugin, LabelSpace, MetricResult
from wsss_domains.evaluation import (
    ConfusionMatrix,
    EvaluationReport,
    compute_scores,
    evaluate_predictions,
    pred_filename,
)

U = IGNORE_INDEX
LS3 = LabelSpace(classes=("bg", "cat", "dog"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))


class TinyDomain(DomainPlugin):
    """Scores the classes given; reports the total of the confusion matrix it is handed."""

    name = "tiny"

    def __init__(self, scored: tuple[int, ...] | None = None) -> None:
        self.scored = scored

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {}

    def scored_classes(self, label_space: LabelSpace) -> tuple[int, ...]:
        return self.scored if self.scored is not None else super().scored_classes(label_space)

    def metrics(self, confusion: Tensor, label_space: LabelSpace) -> list[MetricResult]:
        diag = confusion.diagonal()
        return [
            MetricResult(
                "agreement",
                float(diag.sum() / confusion.sum()),
                {label_space.classes[i]: float(diag[i]) for i in range(label_space.num_classes)},
            )
        ]


def t(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)


# 3x3 example used throughout. Pixel pairs (gt, pred), row by row:
# (0,0) (0,0) (0,1) | (0,0) (1,1) (1,1) | (2,1) (2,2) (2,2)
TARGET = t([[0, 0, 0], [0, 1, 1], [2, 2, 2]])
PRED = t([[0, 0, 1], [0, 1, 1], [1, 2, 2]])
# rows gt, cols pred: gt0 -> 3x0, 1x1; gt1 -> 2x1; gt2 -> 1x1, 2x2
EXPECTED_CM = t([[3, 1, 0], [0, 2, 0], [0, 1, 2]])
# TP = (3, 2, 2), gt totals = (4, 2, 3), pred totals = (3, 4, 2)
IOU = (3 / (4 + 3 - 3), 2 / (2 + 4 - 2), 2 / (3 + 2 - 2))  # 0.75, 0.5, 2/3
DICE = (2 * 3 / (4 + 3), 2 * 2 / (2 + 4), 2 * 2 / (3 + 2))  # 6/7, 2/3, 4/5
RECALL = (3 / 4, 2 / 2, 2 / 3)


def confusion_of(
    pred: Tensor, target: Tensor, num_classes: int, exclude: Tensor | None = None
) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target, exclude)
    return cm


# -- confusion matrix ------------------------------------------------------------------------


def test_confusion_matches_hand_count() -> None:
    cm = confusion_of(PRED, TARGET, 3).compute()
    assert cm.dtype == torch.int64
    assert torch.equal(cm, EXPECTED_CM)


def test_confusion_accumulates_and_merges_across_instances() -> None:
    cm = confusion_of(PRED, TARGET, 3)
    cm.update(TARGET, TARGET)  # a perfect second image adds (4, 2, 3) to the diagonal
    assert torch.equal(cm.compute(), EXPECTED_CM + torch.diag(t([[4, 2, 3]])[0]))
    # Another process's accumulator merges by summation, as under DDP.
    other = confusion_of(PRED, TARGET, 3)
    cm.merge_state(other)
    assert torch.equal(cm.compute(), 2 * EXPECTED_CM + torch.diag(t([[4, 2, 3]])[0]))


def test_ignore_index_and_exclude_are_not_scored() -> None:
    target = t([[0, U, 1], [1, 1, 0]])
    pred = t([[0, 1, 1], [0, 1, 1]])
    exclude = torch.tensor([[False, False, False], [False, False, True]])
    # Scored pairs: (0,0) (1,1) | (1,0) (1,1); (0,1) is ignore and (1,2) excluded.
    cm = confusion_of(pred, target, 2, exclude)
    assert torch.equal(cm.compute(), t([[1, 0], [1, 2]]))
    assert int(cm.compute_unassigned().sum()) == 0


def test_predicted_ignore_on_scored_pixel_is_a_miss() -> None:
    target = t([[0, 0, 1], [1, 1, U]])
    pred = t([[0, U, 1], [U, 1, U]])  # the last pixel is unscored: its ignore prediction is harmless
    cm = confusion_of(pred, target, 2)
    assert torch.equal(cm.compute(), t([[1, 0], [0, 2]]))
    assert torch.equal(cm.compute_unassigned(), t([[1, 1]])[0])
    scores = compute_scores(cm.compute(), (0, 1), cm.compute_unassigned())
    # class 0: TP 1, gt 2 (one unassigned), pred 1 -> 1/2; class 1: TP 2, gt 3, pred 2 -> 2/3
    assert scores.iou.tolist() == pytest.approx([1 / 2, 2 / 3])
    assert scores.pixel_accuracy == pytest.approx(3 / 5)
    assert scores.accuracy.tolist() == pytest.approx([1 / 2, 2 / 3])


def test_confusion_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="prediction holds class id 5"):
        confusion_of(t([[0, 5]]), t([[0, 1]]), 2)
    with pytest.raises(ValueError, match="target holds class id 3"):
        confusion_of(t([[0, 1]]), t([[0, 3]]), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_of(t([[0, 1]]), t([[0], [1]]), 2)


# -- scores ----------------------------------------------------------------------------------


def test_scores_match_hand_computation() -> None:
    s = compute_scores(EXPECTED_CM, (0, 1, 2))
    assert s.iou.tolist() == pytest.approx(IOU)
    assert s.dice.tolist() == pytest.approx(DICE)
    assert s.accuracy.tolist() == pytest.approx(RECALL)
    assert s.miou == pytest.approx((0.75 + 0.5 + 2 / 3) / 3)
    assert s.fwiou == pytest.approx((4 * 0.75 + 2 * 0.5 + 3 * (2 / 3)) / 9)  # = 6/9
    assert s.pixel_accuracy == pytest.approx(7 / 9)
    assert s.mean_accuracy == pytest.approx((3 / 4 + 1 + 2 / 3) / 3)
    assert s.mean_dice == pytest.approx((6 / 7 + 2 / 3 + 4 / 5) / 3)


def test_scores_average_only_scored_classes() -> None:
    s = compute_scores(EXPECTED_CM, (0, 2))
    assert s.miou == pytest.approx((0.75 + 2 / 3) / 2)
    # Pixel totals are over scored gt pixels only: (3 + 2) correct of (4 + 3).
    assert s.pixel_accuracy == pytest.approx(5 / 7)
    assert s.fwiou == pytest.approx((4 * 0.75 + 3 * (2 / 3)) / 7)
    with pytest.raises(ValueError, match="scored classes"):
        compute_scores(EXPECTED_CM, (0, 3))


def test_absent_class_never_predicted_is_nan_and_left_out() -> None:
    cm = confusion_of(t([[0, 0], [1, 1]]), t([[0, 0], [1, 1]]), 3).compute()
    s = compute_scores(cm, (0, 1, 2))
    assert s.iou[:2].tolist() == [1.0, 1.0]
    assert math.isnan(s.iou[2]) and math.isnan(s.dice[2])
    assert s.miou == 1.0 and s.mean_dice == 1.0


def test_absent_class_predicted_counts_as_zero() -> None:
    # (0,0) (0,2) | (1,1) (1,1): class 2 never occurs in gt but is predicted once.
    cm = confusion_of(t([[0, 2], [1, 1]]), t([[0, 0], [1, 1]]), 3).compute()
    s = compute_scores(cm, (0, 1, 2))
    # class 0: TP 1, gt 2, pred 1 -> 1/2; class 1: 1; class 2: 0 / (0 + 1)
    assert s.iou.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert s.miou == pytest.approx(0.5)
    assert s.mean_accuracy == pytest.approx((1 / 2 + 1) / 2)  # recall of an absent class is undefined


# -- report ----------------------------------------------------------------------------------


def _report(cm: Tensor = EXPECTED_CM, unassigned: Tensor | None = None) -> EvaluationReport:
    extra = [MetricResult("kappa", 0.25, {"bg": 0.5, "cat": math.nan})]
    return EvaluationReport.from_confusion(
        cm, LS3.classes, (0, 1, 2), unassigned=unassigned, extra=extra, n_images=2
    )


def test_report_fields() -> None:
    r = _report()
    assert r.per_class_iou == pytest.approx(dict(zip(LS3.classes, IOU, strict=True)))
    assert r.per_class_dice == pytest.approx(dict(zip(LS3.classes, DICE, strict=True)))
    assert (r.miou, r.fwiou, r.pixel_accuracy) == pytest.approx((sum(IOU) / 3, 6 / 9, 7 / 9))
    assert (r.n_pixels, r.n_images) == (9, 2)
    # One more bg pixel left unassigned: bg gt grows to 5, so IoU 3 / (5 + 3 - 3).
    r = _report(unassigned=t([[1, 0, 0]])[0])
    assert r.per_class_iou["bg"] == pytest.approx(3 / 5)
    assert r.n_pixels == 10


def test_json_round_trip_with_nan_as_null() -> None:
    cm = confusion_of(t([[0, 0], [1, 1]]), t([[0, 0], [1, 1]]), 3).compute()
    r = _report(cm)
    text = r.to_json()
    data = json.loads(text)
    assert data["per_class_iou"]["dog"] is None
    assert data["miou"] == pytest.approx(1.0)
    assert data["extra"][0]["per_class"]["cat"] is None
    back = EvaluationReport.from_json(text)
    assert back.to_dict() == r.to_dict()
    assert math.isnan(back.per_class_iou["dog"])
    assert torch.equal(back.confusion, r.confusion) and torch.equal(back.unassigned, r.unassigned)
    assert back.extra[0].name == "kappa" and back.extra[0].value == 0.25


def test_table_lists_every_class_and_summary() -> None:
    cm = confusion_of(t([[0, 0], [1, 1]]), t([[0, 0], [1, 1]]), 3).compute()
    table = _report(cm).to_table()
    lines = table.splitlines()
    for name in LS3.classes:
        assert any(line.split()[0] == name for line in lines)
    dog = next(line for line in lines if line.startswith("dog"))
    assert dog.split()[1:] == ["n/a", "n/a"]
    for label in ("mIoU", "FwIoU", "pixel accuracy", "mean Dice", "kappa"):
        assert any(line.startswith(label) for line in lines)
    header_width = len(lines[0])
    assert all(len(line) == header_width for line in lines[2:5])


def test_plot_writes_png(tmp_path: Path) -> None:
    path = _report().plot_per_class(tmp_path / "plots" / "iou.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert not list(path.parent.glob("*.part"))


# -- evaluate_predictions --------------------------------------------------------------------


def test_pred_filename_is_safe_and_injective() -> None:
    ids = ["a/b", "a_b", "a%2Fb", "slide 1/x:0", "..", ".hidden", "plain-id_0.1"]
    names = [pred_filename(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert name.endswith(".png") and "/" not in name and "\\" not in name and ":" not in name
        assert not name.startswith(".")
    assert pred_filename("plain-id_0.1") == "plain-id_0.1.png"
    with pytest.raises(ValueError):
        pred_filename("")


def _write_pred(pred_dir: Path, sample_id: str, ids: Tensor, palette: bool = True) -> Path:
    path = pred_dir / pred_filename(sample_id)
    array = ids.numpy().astype(np.uint8)
    if palette:
        save_palette_png(path, array, LS3.flat_palette())
    else:
        Image.fromarray(array, mode="L").save(path)
    return path


def _dataset() -> list[dict]:
    image = torch.zeros(3, 3, 3)
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 0] = True  # drops a (0,0) pair
    return [
        {"id": "site/a", "image": image, "mask": TARGET, "exclude": exclude},
        {"id": "b", "image": image, "mask": TARGET},
    ]


def test_evaluate_predictions_on_tiny_dataset(tmp_path: Path) -> None:
    _write_pred(tmp_path, "site/a", PRED)
    pred_b = PRED.clone()
    pred_b[2, 2] = U  # a (2,2) pair becomes a miss of class 2
    _write_pred(tmp_path, "b", pred_b, palette=False)
    report = evaluate_predictions(TinyDomain(), LS3, _dataset(), tmp_path)
    expected = 2 * EXPECTED_CM - t([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    assert torch.equal(report.confusion, expected)
    assert report.unassigned.tolist() == [0, 0, 1]
    assert report.n_images == 2 and report.n_pixels == 17
    # TP = (5, 4, 3); gt = (7, 4, 6); pred = (5, 8, 3)
    iou = (5 / (7 + 5 - 5), 4 / (4 + 8 - 4), 3 / (6 + 3 - 3))
    assert list(report.per_class_iou.values()) == pytest.approx(iou)
    assert report.miou == pytest.approx(sum(iou) / 3)
    assert report.pixel_accuracy == pytest.approx(12 / 17)
    # The domain saw the square matrix.
    assert report.extra[0].value == pytest.approx(12 / 16)
    assert report.extra[0].per_class == {"bg": 5.0, "cat": 4.0, "dog": 3.0}


def test_evaluate_uses_domain_scored_classes(tmp_path: Path) -> None:
    _write_pred(tmp_path, "b", PRED)
    report = evaluate_predictions(TinyDomain((1, 2)), LS3, _dataset()[1:], tmp_path)
    assert list(report.per_class_iou) == ["cat", "dog"]
    assert report.miou == pytest.approx((0.5 + 2 / 3) / 2)


def test_evaluate_missing_prediction_names_file(tmp_path: Path) -> None:
    _write_pred(tmp_path, "b", PRED)
    with pytest.raises(DataError, match="not found") as info:
        evaluate_predictions(TinyDomain(), LS3, _dataset(), tmp_path)
    assert info.value.path == tmp_path / pred_filename("site/a")


def test_evaluate_size_mismatch(tmp_path: Path) -> None:
    path = _write_pred(tmp_path, "b", t([[0, 1], [1, 0]]))
    with pytest.raises(DataError, match="does not match mask size") as info:
        evaluate_predictions(TinyDomain(), LS3, _dataset()[1:], tmp_path)
    assert info.value.path == path


def test_evaluate_class_outside_label_space(tmp_path: Path) -> None:
    bad = PRED.clone()
    bad[1, 1] = 7
    path = _write_pred(tmp_path, "b", bad)
    with pytest.raises(DataError, match="class id 7") as info:
        evaluate_predictions(TinyDomain(), LS3, _dataset()[1:], tmp_path)
    assert info.value.path == path


def test_evaluate_without_masks_or_samples(tmp_path: Path) -> None:
    _write_pred(tmp_path, "b", PRED)
    no_mask = [{"id": "b", "image": torch.zeros(3, 3, 3)}]
    with pytest.raises(ValueError, match="no masks to evaluate against"):
        evaluate_predictions(TinyDomain(), LS3, no_mask, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        evaluate_predictions(TinyDomain(), LS3, [], tmp_path)
    with pytest.raises(DataError, match="prediction folder not found"):
        evaluate_predictions(TinyDomain(), LS3, _dataset(), tmp_path / "nope")


def _toco_pseudo_scores_miou(gts: list[np.ndarray], preds: list[np.ndarray], num_classes: int) -> float:
    """ToCo's ``utils/evaluate.py::pseudo_scores`` transcribed: predicted-255 pixels dropped from the
    ground truth, histogram over valid ground truth, mean IoU over classes with ground-truth pixels."""
    hist = np.zeros((num_classes, num_classes))
    for lt, lp in zip(gts, preds, strict=True):
        lt, lp = lt.flatten().copy(), lp.flatten().copy()
        lt[lp == 255] = 255
        lp[lp == 255] = 0
        mask = (lt >= 0) & (lt < num_classes)
        hist += np.bincount(num_classes * lt[mask].astype(int) + lp[mask], minlength=num_classes**2).reshape(
            num_classes, num_classes
        )
    iu = np.diag(hist) / (hist.sum(axis=1) + hist.sum(axis=0) - np.diag(hist))
    return float(np.nanmean(iu[hist.sum(axis=1) > 0]))


def test_paper_convention_miou_matches_tocos_official_pseudo_scores() -> None:
    rng = np.random.default_rng(3)
    num_classes = 4
    gts = [rng.integers(0, 3, size=(9, 11)) for _ in range(3)]  # class 3 never in the ground truth
    gts[0][0, :4] = 255  # not scored
    preds = [rng.integers(0, 4, size=(9, 11)) for _ in range(3)]  # ... but predicted: no 0 in the mean
    preds[1][2:5, 2:7] = 255  # left unassigned: dropped, not a miss
    metric = ConfusionMatrix(num_classes)
    for gt, pred in zip(gts, preds, strict=True):
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    report = EvaluationReport.from_confusion(
        metric.compute(), ["a", "b", "c", "d"], range(num_classes), metric.compute_unassigned()
    )
    expected = _toco_pseudo_scores_miou(gts, preds, num_classes)
    assert report.miou_paper == pytest.approx(expected, abs=1e-12)
    assert report.miou < report.miou_paper  # the project's own mIoU counts the misses and the false class
    data = report.to_dict()
    assert data["miou_paper_convention"] == pytest.approx(expected)
    assert "ToCo" in data["conventions"]["miou_paper_convention"]
    assert "mIoU (papers)" in report.to_table()
