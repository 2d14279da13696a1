"""`wsss-domains run`: the whole job end to end on the histology demo data, with one report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import main

TINY = ["--backbone", "test_efficientnet", "--weights", "random", "--image-size", "64", "--batch-size", "4"]
TINY += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "4", "--max-steps", "3"]
TINY += ["--device", "cpu", "--no-progress", "--network-window", "128"]


@pytest.mark.slow
def test_run_on_the_demo_data_trains_both_networks_and_reports_both_figures(tmp_path: Path, capsys):
    out = tmp_path / "job"
    assert main(["run", "--domain", "histo", "--out", str(out), *TINY]) == 0  # no --data: the demo set
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and (out / "demo-data" / "WSSS4LUAD-demo").is_dir()
    assert "segmentation (test split, no labels)" in printed and "report.html" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["method"] == "label-probe"  # the histology domain's recommendation
    assert (report["train_split"], report["test_split"]) == ("training", "validation")
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == [
        "classifier",
        "pseudo-labels (training split, labels given)",
        "pseudo-labels (test split, labels given)",
        "segmenter",
        "segmentation (test split, no labels)",
        "pseudo-labels (test split, predicted labels: no labels)",
    ]
    # The training patches carry labels in their names but no masks: nothing to score there.
    assert stages["pseudo-labels (training split, labels given)"]["evaluation"] is None
    for name in (
        "pseudo-labels (test split, labels given)",
        "segmentation (test split, no labels)",
        "pseudo-labels (test split, predicted labels: no labels)",
    ):
        evaluation = stages[name]["evaluation"]
        assert evaluation["n_images"] == 12 and 0.0 <= evaluation["miou"] <= 1.0
    assert len(list((out / "predictions" / "test").glob("*.png"))) == 12
    assert (out / "segmenter" / "model.pt").is_file() and (out / "classifier" / "model.pt").is_file()
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/jpeg;base64," in page  # self-contained, with overlays
    # The gallery: the test images worst first by the segmenter's per-image mIoU, with CAM heat maps.
    per_image = stages["segmentation (test split, no labels)"]["evaluation"]["per_image_miou"]
    assert re.findall(r"<figcaption>#\d+ ([^<]+)<", page) == sorted(per_image, key=per_image.get)
    assert page.count('class="confusion"') == 3 and "per-class CAM heat maps" in page
    assert report["command"] and report["environment"]["wsss-domains"]
    assert "| segmentation (test split, no labels) |" in (out / "report.md").read_text()


def test_run_needs_both_splits_with_data_and_none_without(tmp_path: Path, capsys):
    for args, fragment in (
        (
            ["--data", str(tmp_path), "--train-split", "train"],
            "with --data, give --train-split, --test-split",
        ),
        (["--test-split", "val"], "apply to --data"),
    ):
        assert main(["run", "--domain", "histo", *args]) == 2
        assert fragment in capsys.readouterr().err


def test_cam_scales_are_the_users_else_the_recipes_else_the_default():
    from wsss_domains.cam.settings import DEFAULT_SCALES
    from wsss_domains.domains.contract import Recipe
    from wsss_domains.pipeline.run import cam_scales

    assert cam_scales(None, Recipe()) == DEFAULT_SCALES
    assert cam_scales(None, Recipe(cam_scales=(1, 3))) == (1.0, 3.0)
    assert cam_scales((2.0,), Recipe(cam_scales=(1, 3))) == (2.0,)


@pytest.mark.slow
def test_run_trains_on_a_union_of_annotated_rois_and_name_labelled_patches(tmp_path: Path, capsys):
    from wsss_adapters.histo.demo import N_TRAIN, write_demo

    data = write_demo(tmp_path / "data")
    out = tmp_path / "job"
    train = "validation[fold!=1/3] + training"
    args = ["--data", str(data), "--train-split", train, "--test-split", "validation[fold=1/3]"]
    args += ["--labels-from-masks", "--patch-size", "128"]
    assert main(["run", "--domain", "histo", "--out", str(out), *args, *TINY]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["train_split"] == train
    # Eight ROIs (192-256 px) in 128 px patches, then the 60 training patches whole.
    pseudo_labels = sorted((out / "pseudo-labels" / "train").glob("*.png"))
    from_names = [p for p in pseudo_labels if "%5B" in p.name]  # "[": %-escaped in file names
    assert len(from_names) == N_TRAIN and len(pseudo_labels) > N_TRAIN + 8
    segmenter_line = re.search(r"training segmenter .* on (\d+) pseudo-labelled samples", printed)
    assert segmenter_line is not None and int(segmenter_line[1]) == len(pseudo_labels)
    # Only the ROIs' patches have masks: the training split's score counts them alone.
    stages = {s["name"]: s for s in report["stages"]}
    scored = stages["pseudo-labels (training split, labels given)"]["evaluation"]
    assert scored["n_images"] == len(pseudo_labels) - N_TRAIN
    assert stages["segmentation (test split, no labels)"]["evaluation"]["n_images"] == 4
