"""cross-arch: the two coupling losses against their formulas in NumPy, training, extraction, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from method_training import changed, cli_train_and_pseudo_label, train_steps

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.methods import create_method
from wsss_domains.methods.cross_arch import (
    FusedCamExtractor,
    cam_consistency,
    draw_positions,
    pixel_contrast,
)
from wsss_domains.models.weights import WeightsNotFound

TINY = ["--method-option", "second_backbone=test_resnet", "--method-option", "second_weights=random"]


def np_info_nce(a: np.ndarray, b: np.ndarray, t: float) -> float:
    """-mean_i log softmax_j(cos(a_i, b_j) / t)[i], for ``n x D`` rows."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / t
    logits = logits - logits.max(axis=1, keepdims=True)
    log_soft = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(np.diag(log_soft)))


def test_pixel_contrast_is_the_symmetric_info_nce_of_the_drawn_positions():
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 5, 3, 4, generator=gen), torch.randn(2, 5, 3, 4, generator=gen)
    positions = torch.tensor([[0, 5, 11, 7], [3, 2, 9, 1]])
    expected = []
    for i in range(2):
        a = first[i].reshape(5, -1).numpy().T[positions[i].numpy()].astype(np.float64)
        b = second[i].reshape(5, -1).numpy().T[positions[i].numpy()].astype(np.float64)
        expected.append((np_info_nce(a, b, 0.1) + np_info_nce(b, a, 0.1)) / 2)
    got = pixel_contrast(first, second, positions, temperature=0.1)
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-5)


def test_collapsed_projections_cannot_lower_the_contrast():
    """Constant embeddings score log(n); embeddings equal per position score far lower."""
    n = 6
    positions = torch.arange(n)[None]
    constant = torch.ones(1, 4, 2, 3)
    assert float(pixel_contrast(constant, constant * 2, positions, 0.1)) == pytest.approx(
        math.log(n), rel=1e-6
    )
    distinct = torch.eye(6)[:4].reshape(1, 4, 2, 3) + torch.eye(6)[2:].reshape(1, 4, 2, 3)
    assert float(pixel_contrast(distinct, distinct, positions, 0.1)) < 0.1


def test_draw_positions_are_distinct_and_capped():
    drawn = draw_positions(10, 4, batch=3, generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (3, 4)
    assert all(len(set(row.tolist())) == 4 and max(row.tolist()) < 10 for row in drawn)
    assert draw_positions(5, 256, batch=1).shape == (1, 5)


def test_cam_consistency_is_the_mean_l1_of_max_normalised_labelled_maps():
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])

    def norm(m: np.ndarray) -> np.ndarray:
        m = np.maximum(m, 0)
        return m / max(m.max(), 1e-5)

    terms = [
        np.abs(norm(first[b, k].numpy()) - norm(second[b, k].numpy())).mean()
        for b in range(2)
        for k in range(3)
        if labels[b, k]
    ]
    assert float(cam_consistency(first, second, labels)) == pytest.approx(np.mean(terms), rel=1e-5)
    assert float(cam_consistency(first, second, torch.zeros(2, 3))) == 0.0


def test_training_moves_both_architectures_and_the_projections():
    method = create_method("cross-arch", second_backbone="test_resnet", second_weights="random", warmup=0)
    task, logged, initial = train_steps(method)
    for loss in ("cls2", "align", "cam_consistency"):
        assert math.isfinite(logged[f"train/{loss}"]), loss
    for part in ("second", "head2", "proj1", "proj2"):
        assert changed(task, initial, part), part


def test_fused_cams_average_the_two_heads_on_the_first_grid():
    method = create_method("cross-arch", second_backbone="test_resnet", second_weights="random")
    task, _, _ = train_steps(method, steps=1)
    model, modules = task.model, task.method_modules
    batch = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        first = torch.relu(model.head(model.features(batch)))
        second = torch.relu(modules["head2"](modules["second"].features(batch)))
        second = torch.nn.functional.interpolate(second, size=first.shape[-2:], mode="bilinear")
    fused = FusedCamExtractor(model, modules, source="fused").raw_maps(batch)
    assert torch.allclose(fused, (first + second) / 2, atol=1e-6)
    assert torch.allclose(FusedCamExtractor(model, modules, source="first").raw_maps(batch), first)
    cams = method.extractor(model, modules, scales=(1.0,))(batch[0])
    assert cams.shape == (2, 32, 40) and float(cams.min()) >= 0 and float(cams.max()) <= 1


def test_bad_options_and_missing_second_weights_fail_at_once():
    with pytest.raises(ValueError):
        create_method("cross-arch", cams="both")
    with pytest.raises(ValueError):
        create_method("cross-arch", warmup=1.0)
    method = create_method("cross-arch", second_backbone="test_resnet")  # no weights ship for it
    with pytest.raises(WeightsNotFound, match="second_weights"):
        train_steps(method, steps=1)


def test_cli_trains_with_a_second_architecture_and_pseudo_labels_with_it(capsys, tmp_path: Path):
    _, out = cli_train_and_pseudo_label(capsys, tmp_path, "cross-arch", *TINY)
    assert "pseudo-labels: 3 written" in out


def test_sam_encoder_as_second_architecture_gets_lite_medsam_input_and_stays_frozen():
    from wsss_domains.models.classifier import CamClassifier

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    method = create_method("cross-arch", second_backbone="sam:lite_medsam")
    method.setup(None, mean, std)
    model = CamClassifier(num_classes=2, backbone="test_efficientnet", weights="random")
    modules = method.build_modules(model)
    second = modules["second"]
    assert not any(p.requires_grad for p in second.parameters())
    modules.train()
    assert not second.encoder.training  # frozen: its batch norms keep their statistics
    assert modules["head2"].in_channels == 256
    gen = torch.Generator().manual_seed(3)
    pixels = torch.rand(1, 3, 20, 30, generator=gen) * 0.6 + 0.2
    batch = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    # LiteMedSAM's inference: the image min-max normalised to [0, 1], resized to 256 x 256.
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    expected = torch.nn.functional.interpolate(
        expected, size=(256, 256), mode="bilinear", align_corners=False
    )
    assert torch.allclose(second.sam_input(batch), expected, atol=1e-5)
    features = second.features(batch)
    assert features.shape == (1, 256, 64, 64) and not features.requires_grad


def test_a_missing_sam_checkpoint_fails_at_setup():
    method = create_method(
        "cross-arch", second_backbone="sam:vit_b", sam_checkpoint="/nonexistent/sam_vit_b.pth"
    )
    with pytest.raises(FileNotFoundError, match="sam_vit_b"):
        method.setup(None, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
