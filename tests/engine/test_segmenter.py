"""Stage 2: the segmenter's network, its pseudo-labelled data, training and label-free prediction."""

from __future__ import annotations

import json
from pathlib import Path

import fakes
import numpy as np
import pytest
import timm
import torch
from fakes import fake_domain  # noqa: F401  (the module's fixture)

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import EXIT_USAGE, main
from wsss_domains.data.io import read_index_mask, save_palette_png
from wsss_domains.domains import create_domain
from wsss_domains.errors import UserError
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.segmentation.data import PseudoLabelledDataset, SegmentationView, crop_or_pad
from wsss_domains.segmentation.model import (
    SegmenterConfig,
    build_segmenter,
    load_segmenter,
    save_segmenter,
)

FAST = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32", "--batch-size", "2"]
FAST += ["--max-steps", "2", "--device", "cpu", "--no-progress"]
SEG_FAST = ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--max-steps", "2"]
SEG_FAST += ["--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("fake_domain")


def config(**overrides: object) -> SegmenterConfig:
    values: dict = dict(
        domain=fakes.FAKE_DOMAIN,
        dataset=fakes.DATASET,
        classes=list(fakes.LABEL_SPACE.classes),
        arch="fpn",
        encoder=fakes.FAST_BACKBONE,
        weights="random",
        crop_size=[32, 32],
    )
    return SegmenterConfig(**{**values, **overrides})


def test_the_encoder_starts_from_the_classifiers_weights_file(tmp_path: Path):
    reference = timm.create_model(fakes.FAST_BACKBONE, pretrained=False, num_classes=0, global_pool="")
    path = tmp_path / "backbone.pt"
    torch.save(reference.state_dict(), path)
    model = build_segmenter(config(weights=str(path)))
    encoder = model.encoder.model.state_dict()
    source = reference.state_dict()
    assert encoder and all(torch.equal(encoder[k], source[k]) for k in encoder)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)  # one channel per class of the space


def test_unknown_architectures_and_broken_folders_are_named(tmp_path: Path):
    with pytest.raises(UserError, match="unknown segmenter architecture 'pspnet'"):
        build_segmenter(config(arch="pspnet"))
    with pytest.raises(UserError, match="segmenter.json not found"):
        load_segmenter(tmp_path)
    cfg = config()
    save_segmenter(build_segmenter(cfg), cfg, tmp_path)
    loaded_cfg, model = load_segmenter(tmp_path)
    assert loaded_cfg == cfg and not model.training
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="model.pt: unreadable segmenter weights"):
        load_segmenter(tmp_path)


def test_training_samples_carry_the_pseudo_label_never_the_ground_truth(tmp_path: Path):
    root = fakes.write_shapes(tmp_path / "data", n_train=3)
    base = fakes.build(root, "train")
    pl = tmp_path / "pl"
    for i in range(len(base)):
        sample = base[i]
        fake = np.full(sample["mask"].shape, 2, dtype=np.uint8)  # "blue" everywhere: not the truth
        fake[:4] = fakes.LABEL_SPACE.ignore_index
        save_palette_png(pl / pred_filename(sample["id"]), fake, fakes.LABEL_SPACE.flat_palette())
    dataset = PseudoLabelledDataset(base, pl, fakes.LABEL_SPACE)
    sample = dataset[0]
    assert set(sample) == {"image", "mask", "id"}  # no label, no ground-truth mask
    assert set(sample["mask"].unique().tolist()) == {2, 255}
    (pl / pred_filename(base[1]["id"])).unlink()
    with pytest.raises(Exception, match="train_01.png: pseudo-label not found \\(1 of 3"):
        PseudoLabelledDataset(base, pl, fakes.LABEL_SPACE)


def test_crops_pad_with_ignore_and_the_augmentation_moves_the_mask_with_the_image():
    image = torch.arange(2 * 3).float().reshape(1, 2, 3).expand(3, 2, 3)
    mask = torch.tensor([[0, 1, 2], [1, 2, 0]])
    crop = crop_or_pad({"image": image, "mask": mask}, (4, 4), 255)
    assert crop["image"].shape == (3, 4, 4) and crop["mask"].shape == (4, 4)
    assert torch.equal(crop["mask"][:2, :3], mask) and bool((crop["mask"][2:] == 255).all())
    domain = create_domain(fakes.FAKE_DOMAIN)
    for seed in range(6):  # the default augmentation flips image and mask together (or neither)
        torch.manual_seed(seed)
        out = domain.train_augment({"image": image, "mask": mask})
        assert torch.equal(out["mask"], mask) == torch.equal(out["image"], image)
        assert torch.equal(out["mask"], mask) or torch.equal(out["mask"], mask.flip(-1))
    view = SegmentationView(
        [{"image": torch.rand(3, 20, 40), "mask": torch.zeros(20, 40, dtype=torch.long)}],
        domain,
        fakes.LABEL_SPACE,
        (32, 32),
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
    )
    item = view[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].dtype == torch.long
    assert bool((item["mask"][20:] == 255).all())


def test_scale_range_magnifies_each_training_sample_by_a_factor_drawn_from_it():
    """A 20 x 40 sample in 32 x 32 crops: rows beyond the magnified height are padding (ignore)."""
    sample = {"image": torch.rand(3, 20, 40), "mask": torch.zeros(20, 40, dtype=torch.long)}
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def labelled_rows(scale_range: tuple[float, float], scale: float = 1.0) -> int:
        view = SegmentationView([sample], create_domain(fakes.FAKE_DOMAIN), fakes.LABEL_SPACE, (32, 32), *stats,
                                scale=scale, scale_range=scale_range)  # fmt: skip
        return int((view[0]["mask"] != 255).any(-1).sum())

    assert labelled_rows((1.0, 1.0)) == 20
    assert labelled_rows((0.5, 0.5)) == 10 and labelled_rows((0.5, 0.5), scale=2.0) == 20  # factors multiply
    assert labelled_rows((2.0, 2.0)) == 32
    torch.manual_seed(0)
    # Uniform on [0.5, 2]: 20 x factor labelled rows, at most the crop's 32.
    drawn = [labelled_rows((0.5, 2.0)) for _ in range(40)]
    assert all(10 <= r <= 32 for r in drawn) and min(drawn) < 16 and drawn.count(32) >= 3
    assert len(set(drawn)) >= 8


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A classifier run, pseudo-labels of its training split and a segmenter trained on them (CLI)."""
    tmp = tmp_path_factory.mktemp("seg")
    root = fakes.write_shapes(tmp / "data", n_train=4, n_val=3)
    run, pl, seg = tmp / "run", tmp / "pl", tmp / "seg"
    assert main(["train", "--domain", fakes.FAKE_DOMAIN, "--data", str(root), "--out", str(run), *FAST]) == 0
    args = ["pseudo-labels", "--run", run, "--data", root, "--split", "train", "--out", pl, "--no-progress"]
    assert main([str(a) for a in args]) == 0
    args = ["segment", "--run", run, "--pseudo-labels", pl, "--data", root, "--split", "train", "--out", seg]
    extra = ["--val-split", "val", "--max-epochs", "1", "--scale-range", "0.75,1.5"]
    extra += ["--class-weighting", "median-frequency"]
    assert main([str(a) for a in [*args, *SEG_FAST, *extra]]) == 0
    return {"root": root, "run": run, "pl": pl, "seg": seg}


def test_segment_writes_a_self_contained_model_folder(pipeline_run):
    seg = pipeline_run["seg"]
    cfg = json.loads((seg / "segmenter.json").read_text())
    assert cfg["classes"] == list(fakes.LABEL_SPACE.classes) and cfg["arch"] == "fpn"
    assert cfg["crop_size"] == [32, 32]  # the samples' size, rounded up to the encoders' stride
    assert cfg["scale"] == 1.0 and cfg["scale_range"] == [0.75, 1.5]  # prediction stays at "scale"
    # Median frequency weights of the training pseudo-labels, counted here from their PNGs.
    space = fakes.LABEL_SPACE
    pixels, holding = np.zeros(space.num_classes), np.zeros(space.num_classes)
    for png in sorted(pipeline_run["pl"].glob("*.png")):
        label = read_index_mask(png).numpy()
        label = label[label != space.ignore_index]
        counts = np.bincount(label, minlength=space.num_classes)
        pixels += counts
        holding += np.where(counts > 0, label.size, 0)
    seen = holding > 0
    freq = pixels[seen] / holding[seen]
    expected = np.ones(space.num_classes)
    expected[seen] = np.median(freq) / freq
    assert cfg["class_weights"] == pytest.approx(expected.tolist())
    assert cfg["run"] == str(pipeline_run["run"].resolve())
    log = (seg / "logs" / "metrics.csv").read_text()
    assert "train/loss" in log and "train/miou_vs_pseudo_labels" in log
    assert "val/miou" in log  # the annotated split given for monitoring
    assert (seg / "checkpoints" / "last.ckpt").is_file() and (seg / "model.pt").is_file()


def test_the_encoder_can_start_from_the_runs_trained_classifier(pipeline_run):
    """``--encoder-weights classifier``: the run's weights file, of which the encoder takes the backbone."""
    from wsss_domains.pipeline.segmenter import encoder_weights
    from wsss_domains.training.run import RunConfig

    run = pipeline_run["run"]
    config_run = RunConfig.load(run)
    path = encoder_weights(run, config_run, config_run.backbone, "classifier")
    assert path == str((run / "model.pt").resolve())
    assert encoder_weights(run, config_run, config_run.backbone, "imagenet") == "imagenet"
    trained = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    encoder = build_segmenter(config(weights=path)).encoder.model.state_dict()
    assert encoder and all(torch.equal(t, trained["backbone." + k]) for k, t in encoder.items())
    assert not all(torch.equal(t, trained["backbone." + k]) for k, t in build_segmenter(config()).encoder.model.state_dict().items() if t.is_floating_point())  # fmt: skip
    with pytest.raises(UserError, match="needs the run's backbone as encoder"):
        encoder_weights(run, config_run, "resnet18", "classifier")


def test_predict_reads_only_pixels_and_evaluate_scores_it_like_pseudo_labels(
    pipeline_run, tmp_path: Path, capsys
):
    root, seg = pipeline_run["root"], pipeline_run["seg"]
    # The val split's masks are corrupted: label-free prediction must not read them.
    for mask in (root / "val" / "masks").glob("*.png"):
        mask.rename(mask.with_suffix(".bak"))
    pred = tmp_path / "pred"
    try:
        args = ["predict", "--model", seg, "--data", root, "--split", "val", "--out", pred]
        assert main([str(a) for a in [*args, "--device", "cpu", "--no-progress", "--runtime", "torch"]]) == 0
    finally:
        for mask in (root / "val" / "masks").glob("*.bak"):
            mask.rename(mask.with_suffix(".png"))
    files = sorted(p.name for p in pred.glob("*.png"))
    assert files == ["val_00.png", "val_01.png", "val_02.png"]
    assert read_index_mask(pred / "val_00.png").shape == (32, 32)
    assert (pred / "overlays" / "val_00.png").is_file()
    summary = json.loads((pred / "predictions.json").read_text())
    assert (summary["written"], summary["skipped"], summary["images"]) == (3, 0, 3)
    capsys.readouterr()
    args = ["evaluate", "--domain", fakes.FAKE_DOMAIN, "--data", root, "--split", "val", "--pred", pred]
    assert main([str(a) for a in [*args, "--no-progress"]]) == 0
    assert "mIoU" in capsys.readouterr().out
    # A re-run skips what is done; the ONNX Runtime path gives the same labels.
    onnx = tmp_path / "onnx"
    args = ["predict", "--model", seg, "--data", root, "--split", "val", "--out", onnx]
    assert main([str(a) for a in [*args, "--device", "cpu", "--no-progress", "--runtime", "onnx"]]) == 0
    for name in files:
        assert torch.equal(read_index_mask(onnx / name), read_index_mask(pred / name))
    assert main([str(a) for a in [*args, "--device", "cpu", "--no-progress"]]) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out


def test_predict_on_a_folder_of_images_of_any_layout(pipeline_run, tmp_path: Path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((pipeline_run["root"] / "unlabelled" / "images").glob("*.png"))):
        (images / ("sub" if i else "") / f"x{i}.png").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    args = ["predict", "--model", pipeline_run["seg"], "--images", images, "--out", out]
    assert main([str(a) for a in [*args, "--device", "cpu", "--no-progress"]]) == 0
    assert (out / "x0.png").is_file() and (out / "sub%2Fx1.png").is_file()


def test_bad_segment_and_predict_input_is_one_line(pipeline_run, tmp_path: Path, capsys):
    root, run, seg = pipeline_run["root"], pipeline_run["run"], pipeline_run["seg"]
    cases = [
        (["segment", "--run", run, "--pseudo-labels", tmp_path / "none", "--data", root, "--out", tmp_path / "s"],
         "pseudo-label folder not found"),
        (["segment", "--run", run, "--pseudo-labels", pipeline_run["pl"], "--data", root, "--out", tmp_path / "s",
          "--crop-size", "40"], "--crop-size must be a positive multiple of 32"),
        (["segment", "--run", run, "--pseudo-labels", pipeline_run["pl"], "--data", root, "--out", tmp_path / "s",
          "--scale-range", "2,0.5"], "--scale-range takes LOW,HIGH"),
        (["segment", "--run", run, "--pseudo-labels", pipeline_run["pl"], "--data", root, "--out", tmp_path / "s",
          "--seg-scale", "0"], "--seg-scale must be positive"),
        (["segment", "--run", run, "--pseudo-labels", pipeline_run["pl"], "--data", root, "--out", tmp_path / "s",
          "--seg-training", "carb", "--class-weighting", "median-frequency"],
         "--class-weighting applies to --seg-training cross-entropy"),
        (["segment", "--run", run, "--pseudo-labels", pipeline_run["pl"], "--data", root, "--out", tmp_path / "s",
          "--encoder-weights", "classifier", "--encoder", "resnet18"], "needs the run's backbone as encoder"),
        (["predict", "--model", tmp_path, "--data", root, "--out", tmp_path / "p"], "segmenter.json not found"),
        (["predict", "--model", seg, "--raster", root / "train" / "images" / "train_00.png", "--out", tmp_path / "p"],
         "--out names the GeoTIFF"),
        (["predict", "--model", seg, "--images", root, "--out", tmp_path / "p", "--level", "1"],
         "--level and --mpp apply to --slide"),
        (["predict", "--model", seg, "--images", root, "--out", tmp_path / "p", "--network-window", "100"],
         "--network-window must be a positive multiple of 32"),
    ]  # fmt: skip
    for args, fragment in cases:
        capsys.readouterr()
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("wsss-domains: error: ")]
        assert code == EXIT_USAGE and len(lines) == 1 and fragment in lines[0], (args, err)


def test_a_self_training_label_keeps_the_images_classes_and_the_unassigned_pixels():
    from wsss_domains.pipeline.self_training import allowed_classes, restricted_labels

    space = fakes.LABEL_SPACE  # background (threshold), red, blue
    assert allowed_classes(torch.tensor([0.0, 1.0]), space).tolist() == [True, False, True]
    assert allowed_classes(torch.tensor([0.0, 0.0]), space).tolist() == [True, False, False]
    probs = torch.tensor([[[0.2, 0.1, 0.3]], [[0.5, 0.2, 0.3]], [[0.3, 0.7, 0.4]]])  # 3 x 1 x 3
    previous = torch.tensor([[1, 255, 0]])
    # Red (1) is not in the image: its best pixel goes to the best allowed class; pixel 2 was unassigned.
    got = restricted_labels(probs, torch.tensor([0.0, 1.0]), space, previous)
    assert got.tolist() == [[2, 255, 2]]


def test_a_second_round_trains_on_the_first_segmenters_labels_of_its_training_images(
    pipeline_run, tmp_path: Path
):
    from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter

    settings = SegmenterSettings(
        arch="fpn", weights="random", batch_size=2, max_steps=2, rounds=2, device="cpu"
    )
    out = tmp_path / "seg2"
    config = fit_segmenter(pipeline_run["run"], pipeline_run["pl"], pipeline_run["root"], out, split="train",
                           settings=settings, log=False)  # fmt: skip
    labels = out / "rounds" / "1" / "labels"
    assert (out / "rounds" / "1" / "segmenter" / "model.pt").is_file() and (out / "model.pt").is_file()
    assert config.pseudo_labels == str(labels.resolve())
    dataset = fakes.build(pipeline_run["root"], "train")
    assert len(list(labels.glob("*.png"))) == len(dataset)
    for index in range(len(dataset)):
        sample = dataset[index]
        ids = read_index_mask(labels / pred_filename(sample["id"]))
        first = read_index_mask(pipeline_run["pl"] / pred_filename(sample["id"]))
        absent = [c for c, on in zip((1, 2), sample["label"].tolist(), strict=True) if not on]
        assert not any(bool((ids == c).any()) for c in absent)  # only the image's classes and background
        assert torch.equal(ids == 255, first == 255)
    with pytest.raises(UserError, match="seg-rounds"):
        SegmenterSettings(rounds=0).check()


def test_a_step_budget_with_the_same_seed_trains_the_same_segmenter(pipeline_run, tmp_path: Path):
    """What the held-out benchmarks' step budgets rely on: a seed fixes a step-budgeted run."""
    from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter

    def trained(name: str, seed: int) -> dict[str, torch.Tensor]:
        settings = SegmenterSettings(
            arch="fpn",
            weights="random",
            batch_size=2,
            max_steps=3,
            seed=seed,
            device="cpu",
            scale_range=(0.75, 1.5),
        )
        fit_segmenter(pipeline_run["run"], pipeline_run["pl"], pipeline_run["root"], tmp_path / name,
                      split="train", settings=settings, log=False)  # fmt: skip
        return load_segmenter(tmp_path / name)[1].state_dict()

    a, b, c = trained("a", 3), trained("b", 3), trained("c", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
