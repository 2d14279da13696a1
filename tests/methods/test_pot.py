"""POT (jianwang91/POT) against the formulas of its released code, computed here in numpy.

The expected values never call the project's module: k-means with cosine distance, the
cluster-prototype maps, CLIP's background, the training target, the consistency loss and the
pseudo-label rule are written out below from ``resnet50_POT.py``, ``train_resnet50_POT.py`` and
``make_cam.py`` (see the module docstring of :mod:`wsss_domains.methods.pot`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clip_setup import MEAN, STD, clip_method, tiny_clip
from method_training import FAST_BACKBONE, changed, train_steps

from wsss_domains.cli import main
from wsss_domains.clip.loading import ClipWeightsMissing
from wsss_domains.domains import ClipPrompts, DomainPlugin
from wsss_domains.domains.contract import BackgroundMode, LabelSpace
from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.pot import (
    argmax_seeds,
    clip_background_classes,
    cluster_maps,
    consistency_loss,
    cosine_kmeans,
    pseudo_label_maps,
    training_target,
)
from wsss_domains.models.classifier import CamClassifier

CLASSES = ["cat", "tree"]


class _Domain(DomainPlugin):
    name = "pot-test"

    def datasets(self):
        return {}

    def clip_prompts(self, label_space):
        return ClipPrompts({"cat": ("cat",), "tree": ("tree",)}, background=("ground", "sky", "wall"))


@pytest.fixture
def tiny_weights(tmp_path):
    return tiny_clip(tmp_path, "wsss-tiny-pot", seed=3)


def _method(tiny_weights, **options):
    return clip_method("pot", tiny_weights, _Domain(), classes=CLASSES, **options)


# -- numpy transcriptions of the formulas -------------------------------------------------------


def np_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of ``a`` against rows of ``b``."""
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def np_kmeans(x: np.ndarray, start: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    centres = x[start].copy()
    while True:
        assign = np.argmin(1 - np_cosine(x, centres), axis=1)
        previous = centres.copy()
        for j in range(len(centres)):
            centres[j] = x[assign == j].mean(axis=0)
        if np.sqrt(((centres - previous) ** 2).sum(axis=1)).sum() ** 2 < tol:
            return centres


def np_max_norm(maps: np.ndarray) -> np.ndarray:
    return maps / (maps.reshape(*maps.shape[:2], -1).max(axis=-1)[..., None, None] + 1e-5)


def np_with_background(fg: np.ndarray) -> np.ndarray:
    return np.concatenate([1 - fg.max(axis=1, keepdims=True), fg], axis=1)


def np_cam_class(maps: np.ndarray, clip: np.ndarray) -> np.ndarray:
    b = 1 - clip.max(axis=1, keepdims=True)
    return np_with_background(np.maximum(maps - 0.5 * b, 0))


def np_cam_add(cam_class: np.ndarray, clip: np.ndarray, valid: np.ndarray) -> np.ndarray:
    b = 1 - clip.max(axis=1, keepdims=True)
    x = np_with_background(np.maximum(clip - 0.15 * b, 0)) * valid[:, :, None, None]
    x = np.maximum(1.2 * x - 0.2 * x.sum(axis=1, keepdims=True), 0)
    x = np_max_norm(x)
    x[x < 0.5 * x.mean(axis=3, keepdims=True)] = 0
    agree = x.argmax(axis=1)[:, None] == cam_class.argmax(axis=1)[:, None]
    out = np.where(agree, x + 0.2 * cam_class, x)
    out[out > 1] = 1
    return out


# -- formulas -----------------------------------------------------------------------------------


def test_cosine_kmeans_follows_kmeans_pytorch():
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.normal([3, 0, 1], 0.3, (12, 3)), gen.normal([0, 3, 1], 0.3, (9, 3))])
    torch_gen = torch.Generator().manual_seed(4)
    start = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))[:2].numpy()
    centres = cosine_kmeans(torch.tensor(x, dtype=torch.float32), 2, torch_gen)
    np.testing.assert_allclose(centres.numpy(), np_kmeans(x, start), atol=1e-5)
    with pytest.raises(ValueError, match="1 points into 2"):
        cosine_kmeans(torch.ones(1, 3), 2)


def test_cluster_maps_are_the_mean_cosine_to_each_class_centres_and_carry_gradients():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 5, 4, 4, generator=gen, requires_grad=True)
    seeds = torch.zeros(1, 3, 4, 4)
    seeds[0, 0, 0, :2] = 1  # exactly two seeds: the centres are those features, whatever the start
    seeds[0, 1, 2:, 2:] = 1  # four seeds
    seeds[0, 2, 3, 0] = 1  # one seed: too few for two clusters, map zero
    maps = cluster_maps(seeds, features, clusters=2, generator=torch.Generator().manual_seed(0))

    f = features.detach().numpy()[0].reshape(5, -1).T  # 16 x 5
    expected = np.zeros((3, 16))
    expected[0] = np_cosine(f, f[[0, 1]]).mean(axis=1)
    inside = seeds[0, 1].flatten().numpy() > 0
    # the generator has drawn class 0's start already: redo the draws in the same order
    draws = torch.Generator().manual_seed(0)
    torch.randperm(2, generator=draws)
    start = torch.randperm(4, generator=draws)[:2].numpy()
    expected[1] = np_cosine(f, np_kmeans(f[inside], start)).mean(axis=1)
    np.testing.assert_allclose(maps.detach().numpy()[0].reshape(3, -1), expected, atol=1e-5)

    maps[0, 1].sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_seeds_are_the_argmax_of_present_channels():
    norm_cam = torch.tensor([[[[0.9, 0.1]], [[0.5, 0.2]], [[0.1, 0.8]]]])  # 1 x 3 x 1 x 2
    seeds = argmax_seeds(norm_cam, torch.tensor([[1.0, 1.0, 0.0]]))
    assert seeds[0, :, 0].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # class 2 absent: no seed


def test_training_target_and_loss_follow_the_released_code():
    gen = torch.Generator().manual_seed(7)
    maps = torch.rand(2, 3, 6, 5, generator=gen)
    clip = torch.rand(2, 3, 6, 5, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    clip = clip * labels[:, :, None, None]
    maps = maps * labels[:, :, None, None]
    valid = torch.cat([torch.ones(2, 1), labels], dim=1)

    cam_class = clip_background_classes(maps, clip)
    cam_add = training_target(cam_class, clip, valid)
    expected_class = np_cam_class(maps.numpy(), clip.numpy())
    expected_add = np_cam_add(expected_class, clip.numpy(), valid.numpy())
    np.testing.assert_allclose(cam_class.numpy(), expected_class, atol=1e-6)
    np.testing.assert_allclose(cam_add.numpy(), expected_add, atol=1e-6)

    v = valid.numpy()[:, :, None, None]
    expected_loss = np.abs(np_max_norm(expected_class * v) - np_max_norm(expected_add * v)).mean()
    assert float(consistency_loss(cam_class, cam_add, valid)) == pytest.approx(expected_loss, abs=1e-6)


def np_label_rule(fg: np.ndarray) -> np.ndarray:
    """make_cam.py: each map over its maximum, background + 0.4 against the classes x 2, arg-max."""
    f = np_max_norm(np_with_background(fg[None]))[0]
    winner = np.concatenate([f[:1] + 0.4, 2 * f[1:]]).argmax(axis=0)
    return np.where(winner[None] == np.arange(1, len(f))[:, None, None], f[1:], 0)


def test_pseudo_label_rule_background_plus_0_4_against_twice_the_classes():
    fg = torch.tensor([[[0.9, 0.3, 0.0]], [[0.1, 0.25, 0.0]]])  # 2 classes x 1 x 3
    out = pseudo_label_maps(fg)
    np.testing.assert_allclose(out.numpy(), np_label_rule(fg.numpy()), atol=1e-6)
    assert out[:, 0, 0].tolist()[1] == 0 and out[0, 0, 0] > 0  # class 1 wins the first pixel
    assert out[:, 0, 2].abs().sum() == 0  # nothing there: background


# -- the method through the engine -------------------------------------------------------------


def test_training_moves_the_side_features_and_leaves_clip_alone(tiny_weights):
    method = _method(tiny_weights)
    task, logged, initial = train_steps(method, steps=2)
    assert "train/consistency" in logged and np.isfinite(logged["train/consistency"])
    assert changed(task, initial, "side")
    assert not any(p.requires_grad for p in method._loaded.model.parameters())
    assert not any(k.startswith("clip") for k in task.method_modules.state_dict())


def test_consistency_loss_falls_as_the_side_features_train(tiny_weights):
    torch.manual_seed(0)
    method = _method(tiny_weights)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    modules = method.build_modules(model)
    gen = torch.Generator().manual_seed(2)
    batch = {
        "image": torch.randn(2, 3, 64, 64, generator=gen),
        "label": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
    }
    clip = method.clip_maps(batch["image"], batch["label"])
    assert clip[0, 1].abs().sum() == 0 and clip[1].abs().sum() > 0  # absent class: no CLIP map
    method.clip_maps = lambda images, labels: clip  # CLIP is frozen: the same maps every step
    optimiser = torch.optim.Adam(modules.parameters(), lr=3e-3)
    losses = []  # 64 pixels a side: a 4 x 4 CAM, enough seeds for two clusters
    for _ in range(10):
        outputs = method.forward(model, modules, batch)
        loss = method.training_losses(model, modules, batch, outputs)["consistency"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_pseudo_labels_keep_only_present_classes_where_pot_picks_them(tiny_weights):
    method = _method(tiny_weights)
    task, _, _ = train_steps(method, steps=1)
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0, 0.5))
    image = torch.rand(3, 32, 40)
    normalized = (image - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    cams = extractor(normalized)
    assert cams.shape == (2, 32, 40) and float(cams.min()) >= 0 and float(cams.max()) <= 1 + 1e-6
    space = LabelSpace(
        ("background", *CLASSES), ((0, 0, 0),) * 3, BackgroundMode.THRESHOLD, background_index=0
    )
    context = RefineContext.of(
        image, torch.tensor([1.0, 0.0]), _Domain(), space, bg_threshold=0.0, exclude=None
    )
    cams = torch.zeros_like(cams)  # a designed map: class 0 strong in one block, weak elsewhere
    cams[0] = 0.1
    cams[0, 4:20, 6:26] = 1.0
    refined = method.refine(cams, context)
    # CLIP-ES's maps of the present class (the input POT reads), then the formulas in numpy
    name, path = tiny_weights
    clip_es = create_method("clip-es", clip_model=name, clip_weights=str(path))
    clip_es.setup(_Domain(), MEAN, STD)
    clip = clip_es.refine(torch.zeros_like(cams), context).numpy()
    keep = np.array([1.0, 0.0])[:, None, None]
    expected = np_label_rule(np_cam_class((cams.numpy() * keep)[None], clip[None])[0, 1:])
    np.testing.assert_allclose(refined.numpy(), expected, atol=1e-5)
    assert float(refined[1].abs().sum()) == 0  # absent class
    assert float(clip[0].max()) > 0
    assert bool((refined[0, 4:20, 6:26] > 0).all()) and float(refined[0, 25:].abs().sum()) == 0

    none = _method(tiny_weights, background="none")
    assert torch.equal(none.refine(cams, context), cams)


def test_listed_and_fails_clearly_without_clip_weights(tmp_path, capsys):
    assert "pot" in list_methods()
    assert main(["methods"]) == 0
    assert "pot" in capsys.readouterr().out
    method = create_method("pot", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), MEAN, STD)
    with pytest.raises(ValueError, match="background must be one of"):
        create_method("pot", background="sometimes")
