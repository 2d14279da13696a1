"""cam-fusion: a run's CAMs fused with a second run's (ORANDNet's AND / OR, a precision-weighted mean)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakes  # noqa: E402
from probe_setup import MEAN, STD, TWO, Plain, cached_context, ready  # noqa: E402

from wsss_domains.cam.settings import CamSettings  # noqa: E402
from wsss_domains.cli import main  # noqa: E402
from wsss_domains.data.io import read_index_mask  # noqa: E402
from wsss_domains.domains.contract import LabelSpace  # noqa: E402
from wsss_domains.errors import UserError  # noqa: E402
from wsss_domains.methods import create_method, list_methods  # noqa: E402
from wsss_domains.methods.base import RefineContext  # noqa: E402
from wsss_domains.models.classifier import CamClassifier  # noqa: E402
from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier  # noqa: E402
from wsss_domains.pipeline.pseudo_labels import pseudo_label_split  # noqa: E402
from wsss_domains.training.run import RunConfig, save_model  # noqa: E402

A = np.array([[[0.0, 0.2, 0.5, 1.0]], [[1.0, 0.6, 0.3, 0.0]]], dtype=np.float32)  # K=2, 1x4
B = np.array([[[0.4, 0.4, 0.9, 0.8]], [[0.5, 1.0, 0.0, 0.1]]], dtype=np.float32)


def tiny_run(path: Path, seed: int, classes: tuple[str, ...] = ("a", "b"), **config: object) -> Path:
    """A run folder (``run.json`` + ``model.pt``) of a random tiny classifier over ``classes``."""
    RunConfig(
        domain="plain", dataset="x", classes=list(classes), foreground=list(classes),
        backbone=fakes.FAST_BACKBONE, weights="random", image_size=[32, 32], mean=MEAN, std=STD,
        **config,  # type: ignore[arg-type]
    ).save(path)  # fmt: skip
    torch.manual_seed(seed)
    save_model(
        CamClassifier(len(classes), backbone=fakes.FAST_BACKBONE, weights="random"),
        torch.nn.ModuleDict(),
        path,
    )
    return path


def model_of(seed: int) -> CamClassifier:
    torch.manual_seed(seed)
    return CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()


# -- formulas ---------------------------------------------------------------------------------


def test_registered_and_listed(capsys):
    assert "cam-fusion" in list_methods()
    assert main(["methods"]) == 0
    assert "cam-fusion" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fusion must be one of"):
        create_method("cam-fusion", fusion="xor")
    with pytest.raises(ValueError, match="logic must be one of"):
        create_method("cam-fusion", logic="lukasiewicz")
    # Only fusion=precision learns from the training split.
    assert not create_method("cam-fusion", fusion="or").fits_training_split
    assert create_method("cam-fusion", fusion="precision").fits_training_split


@pytest.mark.parametrize(
    ("fusion", "logic", "expected"),
    [
        ("and", "product", A * B),  # ORANDNet's cam2and
        ("or", "product", A + B - A * B),  # ORANDNet's cam2or
        ("and", "minmax", np.minimum(A, B)),
        ("or", "minmax", np.maximum(A, B)),
    ],
)
def test_and_or_formulas(fusion, logic, expected):
    method = create_method("cam-fusion", fusion=fusion, logic=logic)
    out = method.fuse(torch.from_numpy(A), torch.from_numpy(B))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_second_offset_is_added_to_the_second_maps_before_fusing():
    method = create_method("cam-fusion", fusion="or", second_offset=0.15)
    out = method.fuse(torch.from_numpy(A), torch.from_numpy(B))
    b = B + 0.15
    np.testing.assert_allclose(out.numpy(), A + b - A * b, atol=1e-6)


def test_precision_weights_are_fitted_from_soft_classification_precision(tmp_path):
    first, second = model_of(0), model_of(1)
    run2 = tiny_run(tmp_path / "second", seed=1)
    method = create_method("cam-fusion", second_run=str(run2), fusion="precision", fit_images=8)
    extractor = ready(method, first)
    gen = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 32, 32, generator=gen) for _ in range(5)]
    labels = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    dataset = [
        {"image": im, "label": torch.tensor(y), "id": str(i)}
        for i, (im, y) in enumerate(zip(images, labels, strict=True))
    ]
    method.fit(cached_context(dataset, extractor, tmp_path / "cache"))

    # By hand, in numpy: sigmoid of each model's logits, Laplace-smoothed soft precision, ratio.
    def probs(model: CamClassifier) -> np.ndarray:
        with torch.no_grad():
            logits = [model(((im - 0.5) / 0.25)[None])["logits"][0].numpy() for im in images]
        return 1.0 / (1.0 + np.exp(-np.stack(logits).astype(np.float64)))

    y = np.array(labels)
    pa, pb = probs(first), probs(second)
    prec_a = ((pa * y).sum(0) + 1) / (pa.sum(0) + 2)
    prec_b = ((pb * y).sum(0) + 1) / (pb.sum(0) + 2)
    w = prec_a / (prec_a + prec_b)
    assert method.weights is not None
    np.testing.assert_allclose(method.weights.numpy(), w, atol=1e-5)
    out = method.fuse(torch.from_numpy(A), torch.from_numpy(B))
    np.testing.assert_allclose(out.numpy(), w[:, None, None] * A + (1 - w[:, None, None]) * B, atol=1e-5)

    # A second fit with the same options reads the cached weights.
    assert list((tmp_path / "cache").glob("cam-fusion-*.pt"))
    again = create_method("cam-fusion", second_run=str(run2), fusion="precision", fit_images=8)
    again.fit(cached_context([], ready(again, first), tmp_path / "cache"))
    assert torch.equal(again.weights, method.weights)


def test_refine_fuses_with_the_second_runs_normalised_cams(tmp_path):
    first = model_of(0)
    run2 = tiny_run(tmp_path / "second", seed=1)
    method = create_method("cam-fusion", second_run=str(run2), fusion="and", logic="minmax")
    extractor = ready(method, first)
    image = torch.rand(3, 32, 32)
    x = (image - 0.5) / 0.25
    cams = extractor(x)
    out = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 1.0]), Plain(), TWO, prepared=image))
    with torch.no_grad():  # ready() asks for one scale, no flip
        maps = model_of(1).cams(x[None])
    total = torch.nn.functional.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)[
        0
    ].numpy()
    other = total / np.maximum(total.reshape(2, -1).max(1), 1e-5)[:, None, None]
    np.testing.assert_allclose(out.numpy(), np.minimum(cams.numpy(), other), atol=1e-5)


# -- errors -----------------------------------------------------------------------------------


def test_clear_errors_for_a_missing_or_mismatched_second_run(tmp_path):
    method = create_method("cam-fusion")  # builds from its defaults; fails when used
    with pytest.raises(UserError, match="second_run=PATH"):
        method.setup(Plain(), MEAN, STD)
    with pytest.raises(UserError, match="not a training run folder"):
        create_method("cam-fusion", second_run=str(tmp_path / "nowhere")).setup(Plain(), MEAN, STD)
    three = tiny_run(tmp_path / "three", seed=0, classes=("a", "b", "c"))
    with pytest.raises(UserError, match="3 classes"):
        ready(create_method("cam-fusion", second_run=str(three)), model_of(0))
    renamed = tiny_run(tmp_path / "renamed", seed=0, classes=("a", "z"))
    method = create_method("cam-fusion", second_run=str(renamed))
    ready(method, model_of(0))
    image = torch.rand(3, 32, 32)
    with pytest.raises(UserError, match="must share their classes"):
        method.refine(
            torch.rand(2, 32, 32), RefineContext.of(image, torch.ones(2), Plain(), TWO, prepared=image)
        )
    other = LabelSpace(classes=("a", "z"), palette=((1, 1, 1), (2, 2, 2)))
    assert method.refine(
        torch.rand(2, 32, 32), RefineContext.of(image, torch.ones(2), Plain(), other)
    ).shape == (
        2,
        32,
        32,
    )


# -- end to end: two trained runs -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    fakes.register()
    root = tmp_path_factory.mktemp("fusion")
    data = fakes.write_shapes(root / "data", n_train=4, n_val=3, n_unlabelled=0)
    runs = []
    for name, seed in (("run-a", 0), ("run-b", 1)):
        settings = ClassifierSettings(
            backbone=fakes.FAST_BACKBONE, weights="random", image_size=32, batch_size=2, max_steps=2,
            device="cpu", seed=seed,
        )  # fmt: skip
        runs.append(
            train_classifier(
                fakes.FAKE_DOMAIN, data, root / name, split="train", settings=settings, log=False
            ).run
        )
    yield data, runs[0], runs[1]
    fakes.unregister()


def label(run: Path, data: Path, out: Path, method: str, **options: object) -> list[np.ndarray]:
    summary = pseudo_label_split(
        run, None, None, data, "val", out, method_name=method, options=options, cam=CamSettings(scales=(1.0, 0.5)),
        overlays=False,
    )  # fmt: skip
    assert summary.written == 3
    return [read_index_mask(out / f"val_{k:02d}.png") for k in range(3)]


def test_or_with_an_identical_second_run_is_plain_cam(trained, tmp_path):
    data, run_a, _ = trained
    plain = label(run_a, data, tmp_path / "cam", "cam")
    for fusion in ("or", "and"):
        fused = label(
            run_a, data, tmp_path / fusion, "cam-fusion", second_run=str(run_a), fusion=fusion, logic="minmax"
        )
        for p, f in zip(plain, fused, strict=True):
            assert np.array_equal(p, f)


def test_each_fusion_with_a_second_trained_run_writes_pngs(trained, tmp_path):
    data, run_a, run_b = trained
    for fusion in ("and", "or", "precision"):
        labels = label(run_a, data, tmp_path / fusion, "cam-fusion", second_run=str(run_b), fusion=fusion)
        for ids in labels:
            assert ids.shape == (fakes.SIZE, fakes.SIZE) and set(np.unique(ids).tolist()) <= {0, 1, 2, 255}
    assert list((run_a / "fitted").glob("cam-fusion-*.pt"))  # precision's weights are cached in the run
