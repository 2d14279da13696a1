"""lpcam: local prototypes (k-means of each class's CAM-region features) as in the official LPCAM code.

The expected values are computed here from the official formulas (``step/make_lpcam.py``) in
numpy, not with the module under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from probe_setup import MEAN, STD, TWO, Plain, cached_context, ready, tiny_model
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import fakes  # noqa: E402
from cli_helpers import cli  # noqa: E402

import wsss_domains.training.fit  # noqa: E402, F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import main  # noqa: E402
from wsss_domains.methods import create_method, list_methods  # noqa: E402
from wsss_domains.methods.base import RefineContext  # noqa: E402
from wsss_domains.methods.lpcam import (  # noqa: E402
    Lpcam,
    cosine_kmeans,
    lpcam_maps,
    select_prototypes,
    split_by_cam,
)


def np_cos(features: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``N x h x w`` cosine similarity of a ``D x h x w`` map to each of ``N x D`` vectors."""
    f = features / np.linalg.norm(features, axis=0, keepdims=True)
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.einsum("nd,dhw->nhw", v, f)


def np_lpcam(features: np.ndarray, protos: np.ndarray, context: np.ndarray) -> np.ndarray:
    """make_lpcam: mean cosine to the class prototypes; minus the context's mean, ReLU'd, if any."""
    att = np_cos(features, protos).mean(0)
    if len(context):
        att = np.maximum(att - np_cos(features, context).mean(0), 0.0)
    return att


def test_registered_listed_and_options_checked(capsys):
    assert "lpcam" in list_methods()
    assert Lpcam.fits_training_split and Lpcam.deviations
    assert main(["methods"]) == 0
    assert any(line.split()[:1] == ["lpcam"] for line in capsys.readouterr().out.splitlines())
    method = create_method("lpcam")
    assert (method.k, method.select_thres, method.class_thres) == (12, 0.1, 0.9)
    assert (method.context_thres, method.context_thres_low, method.fuse_weight) == (0.9, 0.05, 1.0)
    for bad in (
        {"k": 0},
        {"fuse_weight": 1.5},
        {"select_thres": -0.1},
        {"max_features": 0},
        {"fit_images": 0},
    ):
        with pytest.raises(ValueError, match="lpcam"):
            create_method("lpcam", **bad)


def test_lpcam_maps_follow_the_official_formula():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 3, 4)).astype(np.float32)
    protos_a, context_a = rng.normal(size=(3, 5)), rng.normal(size=(2, 5))
    protos_b = rng.normal(size=(1, 5))
    got = lpcam_maps(
        torch.from_numpy(features),
        [torch.from_numpy(protos_a), torch.from_numpy(protos_b), torch.zeros(0, 5)],
        [torch.from_numpy(context_a), torch.zeros(0, 5), torch.zeros(0, 5)],
    ).numpy()
    assert got.shape == (3, 3, 4)
    np.testing.assert_allclose(got[0], np_lpcam(features, protos_a, context_a), atol=1e-5)
    # Without context prototypes there is no ReLU: the mean cosine is kept, negative or not.
    expected_b = np_lpcam(features, protos_b, np.zeros((0, 5)))
    assert (expected_b < 0).any()
    np.testing.assert_allclose(got[1], expected_b, atol=1e-5)
    assert not got[2].any()  # no prototypes: nothing


def test_split_by_cam_takes_cells_above_the_threshold_as_features_and_below_as_context():
    # A 2x2 feature grid under a 4x4 CAM: nearest resizing reads CAM pixels (0,0), (0,2), (2,0), (2,2).
    features = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)  # cell (i, j) = [2i+j, 4+2i+j]
    cam = torch.full((4, 4), 0.7)  # the pixels nearest resizing skips: never read
    cam[0, 0], cam[0, 2], cam[2, 0], cam[2, 2] = 0.5, 0.1, 0.05, 0.9
    fg, ctx = split_by_cam(features, cam, select_thres=0.1)
    cells = features.numpy().reshape(2, 4).T  # cell index 2i+j -> its feature vector
    mask = cam.numpy()[::2, ::2].reshape(-1)  # official: F.interpolate(mask, size) (nearest)
    np.testing.assert_array_equal(fg.numpy(), cells[mask > 0.1])  # cells 0 and 3
    np.testing.assert_array_equal(ctx.numpy(), cells[mask < 0.1])  # cell 2; cell 1 (= 0.1) in neither
    assert fg.shape[0] == 2 and ctx.shape[0] == 1
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[2:, 2:] = True  # cell 3
    fg, ctx = split_by_cam(features, cam, 0.1, exclude)
    np.testing.assert_array_equal(fg.numpy(), cells[[0]])
    np.testing.assert_array_equal(ctx.numpy(), cells[[2]])


def test_prototypes_and_context_are_selected_by_the_classifier_softmax():
    weight = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 1.0]])  # 3 classes over 2 features
    centres = torch.tensor([[3.0, 0.0], [0.8, 0.2], [0.0, 3.0], [0.6, 0.5]])
    context = torch.tensor([[0.5, 0.0], [0.0, 2.0], [0.3, 0.3], [2.0, 0.0]])

    def prob(x: torch.Tensor) -> np.ndarray:
        logits = x.numpy() @ weight.numpy().T
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[:, 0]

    protos, ctx = select_prototypes(centres, context, weight, 0, 0.9, 0.9, 0.05)
    p, q = prob(centres), prob(context)
    np.testing.assert_array_equal(protos.numpy(), centres.numpy()[p > 0.9])
    np.testing.assert_array_equal(ctx.numpy(), context.numpy()[(q > 0.05) & (q < 0.9)])
    assert protos.shape[0] == 1 and 0 < ctx.shape[0] < 4  # the context band drops both extremes
    # No centre above class_thres: the most probable one (step_coco's fallback).
    protos, _ = select_prototypes(centres, context, weight, 0, 0.99999, 0.9, 0.05)
    np.testing.assert_array_equal(protos.numpy(), centres.numpy()[[int(p.argmax())]])


def test_cosine_kmeans_groups_by_direction_and_averages_raw_features():
    generator = torch.Generator().manual_seed(0)
    norms = torch.rand(40, 1, generator=generator) * 5 + 0.5
    east = torch.tensor([1.0, 0.05]) + 0.02 * torch.randn(20, 2, generator=generator)
    north = torch.tensor([0.05, 1.0]) + 0.02 * torch.randn(20, 2, generator=generator)
    points = torch.cat([east, north]) * norms  # two directions, very different lengths
    centres = cosine_kmeans(points, 2, tol=1e-8)
    order = centres[:, 0].argsort(descending=True)
    expected = np.stack([points[:20].numpy().mean(0), points[20:].numpy().mean(0)])
    np.testing.assert_allclose(centres[order].numpy(), expected, rtol=1e-5)
    assert torch.equal(cosine_kmeans(points, 2, tol=1e-8), centres)  # seeded
    assert cosine_kmeans(points[:3], 12).shape == (3, 2)  # k above the number of points
    assert cosine_kmeans(points[:0], 12).shape == (0, 2)


def _with_prototypes(method: Lpcam, model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    dim = model.head.weight.shape[1]
    method.prototypes = [torch.randn(3, dim), torch.zeros(0, dim)]  # class b has none
    method.contexts = [torch.randn(2, dim), torch.zeros(0, dim)]


@pytest.mark.parametrize("fuse_weight", [1.0, 0.5])
def test_refine_is_the_official_multiscale_lpcam_of_the_present_classes(fuse_weight: float):
    model = tiny_model()
    method = create_method("lpcam", fuse_weight=fuse_weight)
    method.setup(Plain(), MEAN, STD)
    scales = (1.0, 0.5)
    method.extractor(model, method.build_modules(model), scales=scales, flip=True)
    _with_prototypes(method, model)
    image = torch.rand(3, 64, 64)
    cams = torch.rand(2, 64, 64)
    cams = cams / cams.amax((1, 2), keepdim=True)
    out = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 1.0]), Plain(), TWO))

    # By hand: per scale, features of the image and its mirror summed (flipped back), the
    # official LPCAM formula in numpy, upsampled; summed over scales; divided by the maximum.
    x = (image - 0.5) / 0.25
    total = torch.zeros(64, 64)
    for s in scales:
        size = (round(64 * s), round(64 * s))
        xs = x if s == 1.0 else F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        with torch.no_grad():
            feats = model.features(torch.stack([xs, xs.flip(-1)]))
        f = (feats[0] + feats[1].flip(-1)).numpy()
        att = np_lpcam(f, method.prototypes[0].numpy(), method.contexts[0].numpy())
        att = torch.from_numpy(att).float()[None, None]
        att = F.interpolate(att, size=size, mode="bilinear", align_corners=False)
        if s != 1.0:
            att = F.interpolate(att, size=(64, 64), mode="bilinear", align_corners=False)
        total += att[0, 0]
    lp = (total / total.max()).clamp_min(0)
    if fuse_weight == 1.0:
        expected = lp  # the official LPCAM replaces the CAM
    else:
        fused = (1 - fuse_weight) * cams[0] + fuse_weight * lp
        expected = fused / fused.max()
    assert torch.allclose(out[0], expected, atol=1e-5)
    assert torch.equal(out[1], cams[1])  # no prototypes: its CAM is kept
    # An absent class is left alone.
    only_b = method.refine(cams, RefineContext.of(image, torch.tensor([0.0, 1.0]), Plain(), TWO))
    assert torch.equal(only_b, cams)


def test_refine_before_fit_is_an_error():
    method = create_method("lpcam")
    ready(method, tiny_model())
    with pytest.raises(RuntimeError, match="fit"):
        method.refine(
            torch.rand(2, 32, 32), RefineContext.of(torch.rand(3, 32, 32), torch.ones(2), Plain(), TWO)
        )


def _split(n: int = 4) -> list[dict]:
    """In-memory training samples: a bright left half; a always present, b in odd samples."""
    torch.manual_seed(2)
    samples = []
    for i in range(n):
        image = torch.rand(3, 64, 64) * 0.2
        image[0, :, :32] += 0.7
        samples.append({"image": image, "label": torch.tensor([1.0, 1.0 if i % 2 else 0.0]), "id": str(i)})
    return samples


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(round(v, 5) for v in row) for row in x.tolist())


def test_collection_takes_each_class_cells_of_every_image_labelled_with_it(tmp_path: Path):
    model = tiny_model()
    method = create_method("lpcam", fit_images=10, max_features=10_000)
    extractor = ready(method, model)
    samples = _split()
    features, contexts = method.collect_features(cached_context(samples, extractor, tmp_path))

    # By hand: last-stage features, the normalised CAM nearest-resized to them, > / < select_thres.
    want = {0: ([], []), 1: ([], [])}
    for sample in samples:
        x = (sample["image"] - 0.5) / 0.25
        with torch.no_grad():
            feats = model.features(x[None])[0]
        cams = extractor(x).numpy()
        h, w = feats.shape[-2:]
        rows, cols = np.arange(h) * 64 // h, np.arange(w) * 64 // w  # nearest, exact factor
        cells = feats.flatten(1).T.numpy()
        for c in np.flatnonzero(sample["label"].numpy()):
            mask = cams[c][np.ix_(rows, cols)].reshape(-1)
            want[c][0].append(cells[mask > 0.1])
            want[c][1].append(cells[mask < 0.1])
    for c in (0, 1):
        assert _rows(features[c]) == _rows(torch.from_numpy(np.concatenate(want[c][0])))
        assert _rows(contexts[c]) == _rows(torch.from_numpy(np.concatenate(want[c][1])))
    assert features[0].shape[0] + contexts[0].shape[0] <= 4 * 16  # 4 images, 4x4 cells
    # The cap keeps a sample of the cells, never more.
    capped = create_method("lpcam", fit_images=10, max_features=3)
    ready(capped, model)
    few, few_ctx = capped.collect_features(cached_context(samples, extractor, tmp_path))
    assert all(f.shape[0] <= 3 for f in few + few_ctx)
    assert set(_rows(few[0])) <= set(_rows(features[0]))


def test_fit_clusters_selects_and_caches_the_centres(tmp_path: Path, monkeypatch):
    model = tiny_model()
    method = create_method("lpcam", k=3, fit_images=4)
    extractor = ready(method, model)
    context = cached_context(_split(), extractor, tmp_path)
    method.fit(context)
    assert method.centres is not None and method.prototypes is not None and method.contexts is not None
    assert method.centres[0].shape == (3, model.head.weight.shape[1])
    assert all(p.shape[0] >= 1 for p in method.prototypes)  # a fallback centre at least
    cached = list(tmp_path.glob("lpcam-*.pt"))
    assert len(cached) == 1

    # Selection thresholds and fuse_weight reuse the cached clusters; k does not.
    monkeypatch.setattr(Lpcam, "collect_features", lambda *_: pytest.fail("fitted again"))
    again = create_method("lpcam", k=3, fit_images=4, class_thres=0.5, fuse_weight=0.5)
    ready(again, model)
    again.fit(context)
    assert again.centres is not None
    assert all(torch.equal(a, b) for a, b in zip(again.centres, method.centres, strict=True))
    monkeypatch.undo()
    other = create_method("lpcam", k=2, fit_images=4)
    ready(other, model)
    other.fit(context)
    assert len(list(tmp_path.glob("lpcam-*.pt"))) == 2

    # Applied after fitting: present classes get maps in [0, 1] of the image's size.
    image = torch.rand(3, 64, 64)
    out = method.refine(torch.rand(2, 64, 64), RefineContext.of(image, torch.ones(2), Plain(), TWO))
    assert out.shape == (2, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1.0


def test_pseudo_labels_with_lpcam_end_to_end(capsys, tmp_path: Path):
    fakes.register()
    try:
        root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=3, n_unlabelled=1)
        run = tmp_path / "run"
        fast = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32"]
        fast += ["--batch-size", "2", "--max-steps", "2", "--device", "cpu", "--no-progress"]
        code, _, err = cli(
            capsys, "train", "--domain", fakes.FAKE_DOMAIN, "--data", root, "--out", run, *fast
        )
        assert code == 0, err
        args = ["pseudo-labels", "--run", run, "--data", root, "--split", "val", "--method", "lpcam"]
        args += ["--method-option", "k=3", "--device", "cpu", "--no-progress", "--no-overlays"]
        code, out, err = cli(capsys, *args, "--out", tmp_path / "pl")
        assert code == 0, err
        assert "pseudo-labels: 3 written" in out
        assert len(list((tmp_path / "pl").glob("*.png"))) == 3
        fitted = list((run / "fitted").glob("lpcam-*.pt"))
        assert len(fitted) == 1
        state = torch.load(fitted[0], weights_only=True)
        assert len(state["centres"]) == 2  # red, blue: the CAM channels (background is thresholded)
    finally:
        fakes.unregister()
