"""The HTML reports: per-image scores, worst-first galleries, the confusion table, escaping, the run
page, and `evaluate --html` / `--domain-option` end to end on the fake domain."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import fakes
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_error, cli
from torch import Tensor

from wsss_domains.data.io import save_palette_png
from wsss_domains.domains import DOMAINS, register_domain
from wsss_domains.domains.contract import IGNORE_INDEX, DatasetSpec, DomainPlugin, LabelSpace
from wsss_domains.evaluation import EvaluationReport, evaluate_predictions, pred_filename
from wsss_domains.pipeline.report import SEGMENTATION_STAGE, html_page, markdown, run_gallery
from wsss_domains.pipeline.run import RunReport, StageResult
from wsss_domains.pseudo_labels.overlay import render_overlay, save_overlay
from wsss_domains.reports.html import confusion_table, esc, evaluation_section, gallery, page, row_normalised
from wsss_domains.reports.pictures import HEAT_MAPS, colours, gallery_items

U = IGNORE_INDEX
HOSTILE = "<script>alert('x')</script>&\""
LS3 = LabelSpace(classes=("bg", "cat", HOSTILE), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))


class AllScored(DomainPlugin):
    name = "all-scored"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {}


def t(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)


# Four 2x2 images, (target, prediction). Per image, by hand (IoU = TP / (gt + pred - TP); a scored
# pixel predicted as the ignore index is a miss of its class; classes neither in the image's ground
# truth nor predicted are left out):
#   a: class 0 TP 1, gt 2, pred 1 -> 1/2; class 1 TP 2, gt 2, pred 3 -> 2/3; mIoU (1/2 + 2/3) / 2 = 7/12
#   b: perfect -> 1
#   c: class 1 TP 2, gt 4 (one unassigned), pred 2 -> 1/2; class 2 TP 0, gt 0, pred 1 -> 0; mIoU 1/4
#   d: every pixel ignored -> nothing scored (NaN), last among the worst
IMAGES = {
    "a": (t([[0, 0], [1, 1]]), t([[0, 1], [1, 1]])),
    "b": (t([[0, 2], [2, 2]]), t([[0, 2], [2, 2]])),
    f"c{HOSTILE}": (t([[1, 1], [1, 1]]), t([[2, U], [1, 1]])),
    "d": (t([[U, U], [U, U]]), t([[0, 1], [2, 0]])),
}
BY_HAND = {"a": 7 / 12, "b": 1.0, f"c{HOSTILE}": 1 / 4}


def _write_images(pred_dir: Path) -> list[dict]:
    dataset = []
    for i, (sample_id, (mask, pred)) in enumerate(IMAGES.items()):
        save_palette_png(
            pred_dir / pred_filename(sample_id), pred.numpy().astype(np.uint8), LS3.flat_palette()
        )
        dataset.append({"id": sample_id, "image": torch.full((3, 2, 2), i / 4), "mask": mask})
    return dataset


@pytest.fixture
def evaluated(tmp_path: Path) -> tuple[EvaluationReport, list[dict], Path]:
    dataset = _write_images(tmp_path / "pred")
    return (
        evaluate_predictions(AllScored(), LS3, dataset, tmp_path / "pred"),
        dataset,
        tmp_path / "pred",
    )


# -- per-image scores --------------------------------------------------------------------------


def test_per_image_miou_matches_hand_computation_and_orders_worst_first(evaluated) -> None:
    report, _, _ = evaluated
    assert list(report.per_image) == list(IMAGES)  # evaluation order
    for sample_id, expected in BY_HAND.items():
        assert report.per_image[sample_id] == pytest.approx(expected)
    assert math.isnan(report.per_image["d"])
    ranked = report.worst_images()
    assert [sample_id for sample_id, _ in ranked] == [f"c{HOSTILE}", "a", "b", "d"]
    assert [sample_id for sample_id, _ in report.worst_images(2)] == [f"c{HOSTILE}", "a"]


def test_per_image_scores_round_trip_json_and_old_reports_still_load(evaluated) -> None:
    report, _, _ = evaluated
    data = json.loads(report.to_json())
    assert data["per_image_miou"]["d"] is None and data["per_image_miou"]["a"] == pytest.approx(7 / 12)
    back = EvaluationReport.from_dict(data)
    assert back.to_dict() == report.to_dict()
    old = {k: v for k, v in data.items() if k != "per_image_miou"}  # written before per-image scores
    loaded = EvaluationReport.from_dict(old)
    assert loaded.per_image == {} and loaded.worst_images() == []
    assert loaded.miou == pytest.approx(report.miou)


# -- building blocks ---------------------------------------------------------------------------


def test_confusion_rows_are_normalised_with_counts_in_the_tooltips() -> None:
    confusion = t([[3, 1, 0], [0, 0, 0], [0, 1, 2]])
    unassigned = t([[1, 0, 0]])[0]
    fractions = row_normalised(confusion.tolist(), unassigned.tolist())
    assert fractions[0] == pytest.approx([3 / 5, 1 / 5, 0, 1 / 5])  # unassigned counts in the row
    assert fractions[1] == [None] * 4  # no ground truth of class 1: undefined, not 0
    assert fractions[2] == pytest.approx([0, 1 / 3, 2 / 3, 0])
    html = confusion_table(confusion, ("bg", "cat", "dog"), unassigned)
    cells = re.findall(r"<td title=\"([^\"]*)\"[^>]*>([^<]*)</td>", html)
    assert cells[0] == ("ground truth bg, predicted bg: 3 pixels (60.0 % of the row)", "60")
    assert cells[3] == ("ground truth bg, predicted unassigned: 1 pixels (20.0 % of the row)", "20")
    assert cells[-2] == ("ground truth dog, predicted dog: 2 pixels (66.7 % of the row)", "67")
    # Without unassigned pixels there is no unassigned column.
    assert "unassigned" not in confusion_table(confusion, ("bg", "cat", "dog"), t([[0, 0, 0]])[0])


def test_hostile_class_and_sample_names_are_escaped(evaluated) -> None:
    report, dataset, pred = evaluated
    items = gallery_items(dataset, LS3, {"prediction": pred}, report.worst_images())
    text = page(HOSTILE, evaluation_section(report, colours(LS3)), gallery(items))
    assert "<script>alert" not in text and "alert(&#x27;x&#x27;)" in text
    assert esc(HOSTILE) in text
    assert text.count("<script>") == 1  # only the page's own filter script


def test_gallery_items_follow_the_ranking_with_image_truth_and_prediction(evaluated) -> None:
    report, dataset, pred = evaluated
    items = gallery_items(dataset, LS3, {"prediction": pred}, [*report.worst_images(), ("missing", 0.0)])
    assert [i.sample_id for i in items] == [f"c{HOSTILE}", "a", "b", "d"]  # unknown ids skipped
    assert [title for title, _ in items[0].panels] == ["image", "ground truth", "prediction"]
    html = gallery(items, shown=2)
    scores = re.findall(r'data-score="([^"]*)"', html)
    assert scores == ["0.250000", "0.583333", "1.000000", ""]
    assert "value='2'" in html


def test_cam_heat_maps_of_pseudo_label_overlays_join_the_panels(evaluated) -> None:
    report, dataset, pred = evaluated
    cams = np.stack([np.linspace(0, 1, 4).reshape(2, 2)] * 2)  # two present classes
    picture = render_overlay(
        np.zeros((2, 2, 3)), np.zeros((2, 2), dtype=np.int64), cams, ["cat", "dog"], LS3.flat_palette()
    )
    save_overlay(pred / "overlays" / pred_filename("a"), picture)
    items = gallery_items(dataset, LS3, {"pseudo-label": pred}, [("a", 0.5), ("b", 1.0)], heat_maps=pred)
    title, strip = items[0].panels[-1]
    assert title == HEAT_MAPS and strip.width == 2 * 2  # the two class maps, not the image and label
    assert [title for title, _ in items[1].panels] == ["image", "ground truth", "pseudo-label"]  # no overlay


# -- the run page ------------------------------------------------------------------------------


def _run_report(evaluation: EvaluationReport) -> RunReport:
    report = RunReport(
        domain="fake",
        dataset="shapes",
        data="/data",
        train_split="train",
        test_split="val",
        recipe={"method": "cam", "why": "a test"},
        settings={},
        command="wsss-domains run --domain fake --out 'a b'",
        environment={"python": "3.x", "torch": "2.x"},
    )
    report.stages = [
        StageResult("classifier", "c", 1.0),
        StageResult("pseudo-labels (test split, labels given)", "p", 1.0, evaluation.to_dict()),
        StageResult(SEGMENTATION_STAGE, "s", 1.0, evaluation.to_dict()),
    ]
    return report


def test_run_page_shows_worst_images_confusion_and_the_command(evaluated, tmp_path: Path) -> None:
    evaluation, dataset, pred = evaluated
    report = _run_report(evaluation)
    items = run_gallery(report, dataset, LS3, {"segmenter (no labels)": pred}, limit=3)
    assert [i.sample_id for i in items] == [f"c{HOSTILE}", "a", "b"]
    text = html_page(report, tmp_path, items, colours(LS3))
    assert text.count('class="confusion"') == 2  # one per scored stage
    assert "wsss-domains run --domain fake --out &#x27;a b&#x27;" in text
    assert "<th>torch</th>" not in text and "<td>torch</td><td>2.x</td>" in text
    assert "(the 3 worst of 4)" in text
    assert 'src="data:image/jpeg;base64,' in text and "http" not in text.split("<main>")[1]


def test_run_report_says_where_the_classifier_drew_balanced_images(evaluated, tmp_path: Path) -> None:
    report = _run_report(evaluated[0])
    said = "Classifier trained on class-balanced images (repeat factors, T = 1.5)."
    assert said not in markdown(report) and said not in html_page(report, tmp_path, [])
    report.settings = {"classifier": {"balance_classes": 1.5}}
    assert said in markdown(report) and said in html_page(report, tmp_path, [])
    report.settings = {"classifier": {"balance_classes": 0.0}}  # 0: uniform, as None
    assert said not in markdown(report) and "class-balanced" not in html_page(report, tmp_path, [])


def test_run_page_without_scores_shows_the_first_images(tmp_path: Path) -> None:
    dataset = [{"id": f"im{i}", "image": torch.rand(3, 4, 4)} for i in range(3)]
    report = _run_report(EvaluationReport.from_confusion(t([[1]]), ("bg",), (0,)))
    report.stages = report.stages[:1]  # nothing scored
    items = run_gallery(report, dataset, LS3, {}, limit=2)
    assert [(i.sample_id, i.score) for i in items] == [("im0", None), ("im1", None)]
    assert "not scored" in html_page(report, tmp_path, items)


# -- evaluate --html, --domain-option ------------------------------------------------------------


class NoBackground(fakes.FakeDomain):
    """The fake domain with an option that leaves background out of the scores."""

    name = "fake-no-bg"

    def __init__(self, score_background: bool = True) -> None:
        self.score_background = score_background

    def scored_classes(self, label_space: LabelSpace) -> tuple[int, ...]:
        everything = super().scored_classes(label_space)
        return everything if self.score_background else tuple(c for c in everything if c != 0)


@pytest.fixture(scope="module", autouse=True)
def fake_domains() -> Iterator[None]:
    fakes.register()
    register_domain(NoBackground)
    yield
    DOMAINS.unregister(NoBackground.name)
    fakes.unregister()


@pytest.fixture
def shapes_and_preds(tmp_path: Path) -> tuple[Path, Path]:
    root = fakes.write_shapes(tmp_path / "data", n_train=1, n_val=3, n_unlabelled=0)
    preds = tmp_path / "preds"
    shutil.copytree(root / "val" / "masks", preds)
    fakes.save_mask(preds / "val_01.png", np.zeros((fakes.SIZE, fakes.SIZE), dtype=np.uint8))  # all wrong
    return root, preds


def test_evaluate_html_writes_a_self_contained_page_worst_first(
    capsys, monkeypatch, shapes_and_preds, tmp_path: Path
):
    root, preds = shapes_and_preds
    page_path, json_path = tmp_path / "out" / "eval.html", tmp_path / "eval.json"
    args = ["evaluate", "--domain", "fake", "--data", str(root), "--split", "val", "--pred", str(preds)]
    args += ["--json", str(json_path), "--html", str(page_path), "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["wsss-domains", *args])  # as the shell would start it
    code, out, _ = cli(capsys, *args)
    assert code == 0 and f"report: {page_path}" in out
    per_image = json.loads(json_path.read_text())["per_image_miou"]
    assert per_image["val_00"] == per_image["val_02"] == 1.0 and per_image["val_01"] < 0.5
    text = page_path.read_text()
    ids = re.findall(r"<figcaption>#\d+ ([^<]+)<", text)
    assert ids == ["val_01", "val_00", "val_02"]  # worst first, ties in evaluation order
    assert 'class="confusion"' in text and "Command and environment" in text
    assert f"<pre>{esc(shlex.join(sys.argv))}</pre>" in text  # the command line as given
    assert not re.search(r"(src|href)=[\"'](https?:)?//", text)  # nothing fetched from outside


def test_evaluate_domain_option_reaches_the_plugin(capsys, shapes_and_preds, tmp_path: Path):
    root, preds = shapes_and_preds
    json_path = tmp_path / "eval.json"
    args = ["evaluate", "--domain", NoBackground.name, "--data", root, "--split", "val", "--pred", preds]
    code, _, _ = cli(capsys, *args, "--domain-option", "score_background=false", "--json", json_path)
    assert code == 0
    assert list(json.loads(json_path.read_text())["per_class_iou"]) == ["red", "blue"]
    code, _, err = cli(capsys, *args, "--domain-option", "colour=red")
    assert_one_error(code, err, "colour")
