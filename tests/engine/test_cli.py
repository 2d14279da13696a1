"""The `wsss-domains` command line, in process, on the fake domain's on-disk data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import fakes
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_error, cli
from fakes import fake_domain  # noqa: F401  (the module's fixture)
from PIL import Image

# Imported here, not first inside a capsys test: Lightning's log handler keeps the stderr it sees first.
import wsss_domains.training.fit  # noqa: F401
from wsss_domains.cli import main
from wsss_domains.data.io import read_index_mask

FAST = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32", "--batch-size", "2"]
FAST += ["--max-steps", "2", "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("fake_domain")


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    return fakes.write_shapes(tmp_path / "data", n_train=4, n_val=3, n_unlabelled=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One short training run on pristine data, shared by the pseudo-label and evaluate tests."""
    root = fakes.write_shapes(tmp_path_factory.mktemp("pristine") / "data")
    run = root.parent / "run"
    assert main(["train", "--domain", fakes.FAKE_DOMAIN, "--data", str(root), "--out", str(run), *FAST]) == 0
    return root, run


# -- listing ---------------------------------------------------------------------------------


def test_domains_lists_histo_with_its_loaders_and_the_runtime_plugin(capsys):
    code, out, _ = cli(capsys, "domains")
    assert code == 0
    assert "histo  (wsss_adapters.histo:HistoDomain)" in out
    histo = out[out.index("histo  (") :].split("\n\n")[0]
    for loader in ("wsss4luad", "luad-histoseg", "bcss-wsss", "glas"):
        assert f"--dataset {loader}" in histo
    assert "fake  (registered at run time)" in out
    assert "--dataset shapes " in out and "3 classes (background, red, blue); background: threshold" in out


def test_methods_lists_cam(capsys):
    code, out, _ = cli(capsys, "methods")
    assert code == 0
    assert any(line.split()[0] == "cam" and "Zhou" in line for line in out.splitlines())
    segmenter_part = out.split("Segmenter training")[1]
    assert any(line.split()[:2] == ["beco", "BECO"] for line in segmenter_part.splitlines() if line.strip())


# -- bad input: one clear error, exit code 2, nothing written ---------------------------------


def unreadable_image(root: Path) -> None:
    (root / "train" / "images" / "train_01.png").write_bytes(b"this is not a PNG")


def mask_of_another_size(root: Path) -> None:
    fakes.save_mask(root / "train" / "masks" / "train_01.png", np.zeros((16, 16), dtype=np.uint8))


def label_vector_too_long(root: Path) -> None:
    (root / "train" / "labels.json").write_text(json.dumps({"train_01": [1, 0, 1]}))


def unknown_class_id(root: Path) -> None:
    mask = fakes.shapes_mask(1)
    mask[0, 0] = 7
    fakes.save_mask(root / "train" / "masks" / "train_01.png", mask)


def empty_split(root: Path) -> None:
    for path in (root / "train" / "images").iterdir():
        path.unlink()


BAD_DATA: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "unreadable image": (unreadable_image, ("train_01.png: unreadable image",)),
    "mask size": (
        mask_of_another_size,
        ("train_01.png: mask size (16, 16) does not match image size (32, 32)",),
    ),
    "label length": (
        label_vector_too_long,
        ("sample train_01: label vector has 3 entries, expected 2 (red, blue)",),
    ),
    "unknown class id": (unknown_class_id, ("masks/train_01.png: mask holds class id 7, outside 0..2",)),
    "empty split": (empty_split, ("split 'train' of shapes holds no images",)),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_train_on_bad_data_fails_cleanly_before_writing(capsys, shapes: Path, tmp_path: Path, case: str):
    breaker, fragments = BAD_DATA[case]
    breaker(shapes)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--domain", "fake", "--data", shapes, "--out", out, *FAST)
    assert_one_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("case", ["unreadable image", "label length"])
def test_pseudo_labels_on_bad_data_fail_before_the_first_file(
    capsys, shapes: Path, tmp_path: Path, trained: tuple[Path, Path], case: str
):
    breaker, fragments = BAD_DATA[case]
    breaker(shapes)  # breaks train_01, the second image: the first would be written by a lazy check
    out = tmp_path / "pl"
    code, _, err = cli(
        capsys, "pseudo-labels", "--run", trained[1], "--data", shapes, "--split", "train", "--out", out
    )
    assert_one_error(code, err, *fragments)
    assert not out.exists() or not any(out.rglob("*"))


def train_args(shapes: Path, out: Path, **changes: str | None) -> list[str | Path]:
    """Train arguments with some replaced (value) or removed (None); later flags win in argparse."""
    options: dict[str, str | Path | None] = {"--domain": "fake", "--data": shapes, "--out": out, **changes}
    args: list[str | Path] = ["train", *FAST]
    for flag, value in options.items():
        if value is not None:
            args += [flag, value]
    return args


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"--weights": "/nope.pth"}, ("weights file /nope.pth does not exist (--weights)",)),
        ({"--domain": "nope"}, ("unknown domain 'nope'; available:", "histo")),
        ({"--dataset": "nope"}, ("domain 'fake' has no dataset 'nope'; known: shapes, shapes-declared",)),
        ({"--split": "nope"}, ("split 'nope' not found",)),
        ({"--max-minutes": "-1"}, ("--max-minutes must be positive, got -1.0",)),
        ({"--max-steps": "0"}, ("--max-steps must be positive (or -1: no limit), got 0",)),
        ({"--image-size": "0"}, ("--image-size must be at least 16 pixels, got 0",)),
        ({"--batch-size": "0"}, ("--batch-size must be at least 1, got 0",)),
    ],
)
def test_train_with_bad_arguments_fails_cleanly(capsys, shapes: Path, tmp_path: Path, changes, fragments):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *train_args(shapes, out, **changes))
    assert_one_error(code, err, *fragments)
    assert not out.exists()


def test_unrecognised_layout_without_dataset_asks_for_dataset(capsys, tmp_path: Path):
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    code, _, err = cli(capsys, *train_args(plain, tmp_path / "run"))
    assert_one_error(
        code, err, "no 'fake' dataset layout recognised (known: shapes, shapes-declared)", "--dataset"
    )
    assert not (tmp_path / "run").exists()


def test_missing_data_folder(capsys, tmp_path: Path):
    code, _, err = cli(capsys, *train_args(tmp_path / "absent", tmp_path / "run"))
    assert_one_error(code, err, "absent: data folder does not exist")


def test_pseudo_labels_on_a_folder_without_run_json(capsys, shapes: Path, tmp_path: Path):
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    out = tmp_path / "pl"
    code, _, err = cli(capsys, "pseudo-labels", "--run", not_a_run, "--data", shapes, "--out", out)
    assert_one_error(code, err, "run.json not found", "train --out")
    assert not out.exists()


def test_evaluate_with_a_missing_prediction_names_it(capsys, shapes: Path, tmp_path: Path):
    preds = tmp_path / "pred"
    preds.mkdir()
    code, _, err = cli(
        capsys, "evaluate", "--domain", "fake", "--data", shapes, "--split", "val", "--pred", preds
    )
    assert_one_error(code, err, "val_00.png: prediction not found")


# -- evaluate --------------------------------------------------------------------------------


def test_evaluate_writes_json_with_miou_and_per_class_iou(capsys, shapes: Path, tmp_path: Path):
    perfect = tmp_path / "perfect"
    shutil.copytree(shapes / "val" / "masks", perfect)
    report = tmp_path / "perfect.json"
    code, out, _ = cli(
        capsys, "evaluate", "--domain", "fake", "--data", shapes, "--split", "val", "--pred", perfect,
        "--json", report, "--no-progress",
    )  # fmt: skip
    assert code == 0 and "mIoU" in out
    scores = json.loads(report.read_text())
    assert scores["miou"] == 1.0
    assert scores["per_class_iou"] == {"background": 1.0, "red": 1.0, "blue": 1.0}

    # Everything predicted background: IoU(bg) = bg pixels / all pixels, red and blue 0.
    masks = [read_index_mask(p).numpy() for p in sorted((shapes / "val" / "masks").iterdir())]
    allbg = tmp_path / "allbg"
    for path in perfect.iterdir():
        fakes.save_mask(allbg / path.name, np.zeros((32, 32), dtype=np.uint8))
    bg_share = sum(int((m == 0).sum()) for m in masks) / sum(m.size for m in masks)
    report = tmp_path / "allbg.json"
    code, _, _ = cli(
        capsys, "evaluate", "--domain", "fake", "--data", shapes, "--split", "val", "--pred", allbg,
        "--json", report, "--no-progress",
    )  # fmt: skip
    assert code == 0
    scores = json.loads(report.read_text())
    assert scores["per_class_iou"] == pytest.approx({"background": bg_share, "red": 0.0, "blue": 0.0})
    assert scores["miou"] == pytest.approx(bg_share / 3)


# -- the pipeline ----------------------------------------------------------------------------


def test_train_pseudo_labels_evaluate_end_to_end(capsys, trained: tuple[Path, Path], tmp_path: Path):
    root, run = trained
    for name in ("model.pt", "run.json", "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    config = json.loads((run / "run.json").read_text())
    assert (config["domain"], config["dataset"], config["split"]) == ("fake", "shapes", "train")
    assert config["foreground"] == ["red", "blue"]

    pl = tmp_path / "pl"
    args = ["pseudo-labels", "--run", run, "--data", root, "--split", "val", "--out", pl]
    code, out, err = cli(
        capsys, *args, "--save-cams", "--scales", "1,0.5", "--device", "cpu", "--no-progress"
    )
    assert code == 0, err
    assert f"pseudo-labels: 3 written, 0 already done -> {pl}" in out
    assert "note:" not in out  # the val split carries labels
    for k in range(3):
        with Image.open(pl / f"val_{k:02d}.png") as png:
            assert png.mode == "P" and png.size == (32, 32)
        assert (pl / "overlays" / f"val_{k:02d}.png").is_file()
        with np.load(pl / "cams" / f"val_{k:02d}.npz") as npz:
            assert npz["cams"].dtype == np.float16
    code, out, _ = cli(capsys, *args, "--save-cams", "--device", "cpu", "--no-progress")
    assert code == 0 and "pseudo-labels: 0 written, 3 already done" in out

    report = tmp_path / "metrics.json"
    code, out, _ = cli(
        capsys, "evaluate", "--domain", "fake", "--data", root, "--split", "val", "--pred", pl,
        "--json", report, "--no-progress",
    )  # fmt: skip
    assert code == 0
    scores = json.loads(report.read_text())
    assert 0.0 <= scores["miou"] <= 1.0
    assert set(scores["per_class_iou"]) == {"background", "red", "blue"}
    assert scores["n_images"] == 3


def test_pseudo_labels_and_evaluate_score_tiles(capsys, trained: tuple[Path, Path], tmp_path: Path):
    root, run = trained
    pl = tmp_path / "pl"
    code, out, err = cli(
        capsys, "pseudo-labels", "--run", run, "--data", root, "--split", "val", "--tiles", "16", "--out", pl,
        "--device", "cpu", "--no-progress", "--no-overlays",
    )  # fmt: skip
    assert code == 0, err
    assert "pseudo-labels: 12 written" in out  # 3 images of 32x32, 4 tiles each
    for png in pl.glob("*.png"):
        with Image.open(png) as image:
            assert image.size == (16, 16)
    report = tmp_path / "tiles.json"
    code, _, err = cli(
        capsys, "evaluate", "--domain", "fake", "--data", root, "--split", "val", "--tiles", "16",
        "--pred", pl, "--json", report, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(report.read_text())["n_images"] == 12
    # Whole-image scoring of tile predictions finds no prediction for the first image.
    code, _, err = cli(capsys, "evaluate", "--domain", "fake", "--data", root, "--split", "val", "--pred", pl)
    assert code != 0 and "val_00" in err
    code, _, err = cli(
        capsys, "evaluate", "--domain", "fake", "--data", root, "--split", "val", "--tiles", "4", "--pred", pl
    )
    assert_one_error(code, err, "--tiles must be at least 16")


def test_seed_probe_fits_on_the_runs_training_split_once_and_needs_its_folder(
    capsys, trained: tuple[Path, Path], tmp_path: Path
):
    root, trained_run = trained
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    common = ["--method", "seed-probe", "--device", "cpu", "--no-progress", "--no-overlays"]
    args = ["pseudo-labels", "--run", run, "--data", root, "--split", "val", *common]
    code, out, err = cli(capsys, *args, "--out", tmp_path / "pl")
    assert code == 0, err
    assert "pseudo-labels: 3 written" in out
    fitted = list((run / "fitted").glob("seed-probe-*.pt"))
    assert len(fitted) == 1
    # Background is thresholded in the fake domain: the probe has red, blue and background outputs.
    assert torch.load(fitted[0], weights_only=True)["linear.weight"].shape[0] == 3
    stamp = fitted[0].stat().st_mtime_ns
    code, _, err = cli(capsys, *args, "--out", tmp_path / "pl2")
    assert code == 0, err
    assert fitted[0].stat().st_mtime_ns == stamp  # loaded, not fitted again

    # The training folder recorded in the run is gone: one clear error, nothing written.
    config = json.loads((run / "run.json").read_text())
    config["data"] = str(tmp_path / "moved-away")
    (run / "run.json").write_text(json.dumps(config))
    shutil.rmtree(run / "fitted")
    code, _, err = cli(capsys, *args, "--out", tmp_path / "pl3")
    assert_one_error(code, err, "seed-probe", "moved-away", "is gone")
    assert not (tmp_path / "pl3").exists() or not any((tmp_path / "pl3").glob("*.png"))


def test_label_probe_fits_on_overlapping_mask_labelled_windows_of_a_labels_from_masks_run(
    capsys, shapes: Path, tmp_path: Path, monkeypatch
):
    from wsss_domains.methods import label_probe

    run = tmp_path / "run"
    train = ["train", "--domain", fakes.FAKE_DOMAIN, "--data", shapes, "--split", "train", "--out", run]
    code, _, err = cli(capsys, *train, "--labels-from-masks", "--patch-size", "16", *FAST)
    assert code == 0, err
    bag_counts: list[int] = []
    fit = label_probe.fit_mil_probe

    def counting(bags, labels, valid, *args, **kwargs):
        bag_counts.append(bags.shape[0])
        return fit(bags, labels, valid, *args, **kwargs)

    monkeypatch.setattr(label_probe, "fit_mil_probe", counting)
    args = ["pseudo-labels", "--run", run, "--data", shapes, "--split", "val", "--labels-from-masks"]
    common = ["--method", "label-probe", "--device", "cpu", "--no-progress", "--no-overlays"]
    code, out, err = cli(capsys, *args, *common, "--out", tmp_path / "pl")
    assert code == 0, err
    assert "pseudo-labels: " in out and len(list((run / "fitted").glob("label-probe-*.pt"))) == 1
    # 4 training images of 32 px: training's grid has 2 x 2 patches of 16 px each, the fit's
    # quarter-patch stride 5 x 5 windows each.
    assert bag_counts == [4 * 25]


def test_pseudo_labels_of_a_split_without_labels_say_predictions_were_used(
    capsys, trained: tuple[Path, Path], tmp_path: Path
):
    root, run = trained
    pl = tmp_path / "pl"
    code, out, _ = cli(
        capsys, "pseudo-labels", "--run", run, "--data", root, "--split", "unlabelled", "--out", pl,
        "--device", "cpu", "--no-progress", "--no-overlays",
    )  # fmt: skip
    assert code == 0
    assert (
        "note: 2 image(s) carry no image-level labels in this split; the classifier's predicted labels" in out
    )
    summary = json.loads((pl / "pseudo-labels.json").read_text())
    assert summary["predicted_label_images"] == 2 and summary["written"] == 2
    assert not (pl / "overlays").exists()


def test_pseudo_labels_take_their_labels_from_a_segmentation_folder(
    capsys, trained: tuple[Path, Path], tmp_path: Path
):
    root, run = trained
    for class_id in (1, 2):  # red everywhere, then blue everywhere: the pseudo-labels follow
        segmentation = tmp_path / f"seg{class_id}"
        segmentation.mkdir()
        for k in range(3):
            Image.fromarray(np.full((32, 32), class_id, np.uint8), mode="L").save(
                segmentation / f"val_{k:02d}.png"
            )
        pl = tmp_path / f"pl{class_id}"
        code, out, err = cli(
            capsys, "pseudo-labels", "--run", run, "--data", root, "--split", "val", "--out", pl,
            "--label-free", "segmentation", "--label-segmentation", segmentation, "--device", "cpu",
            "--no-progress", "--no-overlays",
        )  # fmt: skip
        assert code == 0, err
        assert json.loads((pl / "pseudo-labels.json").read_text())["label_source"] == "segmentation"
        for k in range(3):
            assert set(np.unique(np.asarray(Image.open(pl / f"val_{k:02d}.png"))).tolist()) <= {0, class_id}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label-free", "segmentation"], "--label-free segmentation needs --label-segmentation DIR"),
        (["--label-segmentation", "x"], "--label-segmentation applies to --label-free segmentation"),
        (["--label-free", "all", "--labels-from-masks"], "--label-free ignores the images' labels"),
        (
            ["--label-free", "segmentation", "--label-segmentation", "x", "--label-fraction", "2"],
            "must lie in",
        ),
        (["--label-fraction", "0.05"], "--label-fraction applies to --label-free segmentation"),
        (
            ["--label-free", "all", "--label-fraction", "0.05"],
            "--label-fraction applies to --label-free segmentation",
        ),
    ],
)
def test_label_free_flags_are_checked_before_any_work(capsys, shapes: Path, tmp_path: Path, flags, message):
    code, _, err = cli(
        capsys, "pseudo-labels", "--run", tmp_path / "no-run", "--data", shapes, "--out", tmp_path / "pl", *flags
    )  # fmt: skip
    assert code != 0 and message in err
    assert not (tmp_path / "pl").exists()


def test_a_dataset_declaring_its_classes_in_the_folder_trains_on_those_classes(capsys, tmp_path: Path):
    root = fakes.write_shapes(tmp_path / "declared", n_train=4, n_val=1, n_unlabelled=0, declared=True)
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--domain", "fake", "--data", root, "--out", run, *FAST)
    assert code == 0, err
    assert "on shapes-declared/train" in out  # recognised from the folder
    config = json.loads((run / "run.json").read_text())
    assert config["classes"] == ["background", "red", "blue"] and config["foreground"] == ["red", "blue"]


def test_damaged_files_in_a_run_are_named_in_one_line(capsys, trained: tuple[Path, Path], tmp_path: Path):
    root, run = trained
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    model = broken / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    code, _, err = cli(capsys, "pseudo-labels", "--run", broken, "--data", root, "--out", tmp_path / "pl")
    line = assert_one_error(code, err, "model.pt: unreadable model weights")
    assert "weights_only=False" not in line  # torch's unsafe suggestion is not passed on
    ckpt = broken / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    code, _, err = cli(capsys, *train_args(root, broken))
    assert_one_error(code, err, "last.ckpt: damaged checkpoint", "delete it to train from the start")


def test_bad_scales_and_a_file_in_the_way_of_out_are_one_line(
    capsys, trained: tuple[Path, Path], tmp_path: Path
):
    root, run = trained
    for flag, value, message in (
        ("--scales", "0", "--scales must lie in (0, 8]"),
        ("--scales", "1,-0.5", "--scales must lie in (0, 8]"),
        ("--max-image-pixels", "-1", "--max-image-pixels must be >= 0"),
    ):
        code, _, err = cli(
            capsys, "pseudo-labels", "--run", run, "--data", root, "--out", tmp_path / "pl", flag, value
        )
        assert_one_error(code, err, message)
    assert not (tmp_path / "pl").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = cli(
        capsys, "pseudo-labels", "--run", run, "--data", root, "--out", blocker / "pl", "--no-progress"
    )
    assert_one_error(code, err, str(blocker))


@pytest.mark.parametrize(
    ("option", "fragments"),
    [
        (
            "fuse_wieght=0.7",
            ("method 'cam-proto' has no option 'fuse_wieght'", "fuse_weight (float, default 0.5)"),
        ),
        ("stage=deep", ("method 'cam-proto': option 'stage' expects int, got 'deep'",)),
    ],
)
def test_pseudo_labels_with_a_bad_method_option_fail_by_name_before_writing(
    capsys, shapes: Path, tmp_path: Path, trained: tuple[Path, Path], option: str, fragments
):
    out = tmp_path / "pl"
    code, _, err = cli(
        capsys,
        "pseudo-labels",
        "--run",
        trained[1],
        "--data",
        shapes,
        "--split",
        "val",
        "--method",
        "cam-proto",
        "--method-option",
        option,
        "--out",
        out,
    )
    assert_one_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    "command", ["train", "segment", "predict", "evaluate", "pseudo-labels", "run", "bench"]
)
def test_help_shows_defaults_worth_showing_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for nothing in ("(default: None)", "(default: False)", "(default: [])"):
        assert nothing not in text
    assert "(default: the loader's) (default" not in text  # a default the help states is not repeated
    if command == "train":
        assert "(default: -1)" in text  # --max-steps: a real default is still shown
        assert "random seed (default: 0)" in text  # 0 is a default, though 0 == False
