"""PPC against its defining formulas and an independent transcription of the official saliency-free code
(usr922/wseg, ``contrast_train.py``), then training."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from method_training import FAST_BACKBONE, changed, train_steps
from torch.nn import functional as F

from wsss_domains.methods import create_method
from wsss_domains.methods.ppc import (
    HARD_END,
    Ppc,
    contrast_scores,
    intra_view_nce,
    ppc_losses,
    prototype_nce,
    prototypes,
    pseudo_labels,
)
from wsss_domains.methods.seam import PcmCamExtractor
from wsss_domains.models.classifier import CamClassifier

T = 0.1


def test_prototype_is_the_score_weighted_mean_of_the_top_pixels_normalised():
    scores = torch.tensor([[[[0.9, 0.1], [0.5, 0.2]], [[0.0, 0.3], [0.0, 0.6]]]])  # 1 x C=2 x 2 x 2
    features = torch.tensor([[[[1.0, 5.0], [0.0, 7.0]], [[0.0, 5.0], [2.0, 1.0]]]])  # D=2
    protos = prototypes(scores, features, top_share=2)  # k = 2*2 // 2 = 2 pixels per channel
    # channel 0: pixels 0 (0.9, f=[1,0]) and 2 (0.5, f=[0,2]); channel 1: pixels 3 (0.6, [7,1]), 1 (0.3, [5,5])
    p0 = [(0.9 * 1 + 0.5 * 0) / 1.4, (0.9 * 0 + 0.5 * 2) / 1.4]
    p1 = [(0.6 * 7 + 0.3 * 5) / 0.9, (0.6 * 1 + 0.3 * 5) / 0.9]

    def unit(v: list[float]) -> list[float]:
        n = math.hypot(*v)
        return [x / n for x in v]

    torch.testing.assert_close(protos, torch.tensor([unit(p0), unit(p1)]))


def test_prototypes_pool_the_whole_batch():
    scores = torch.zeros(2, 1, 4, 4)
    scores[1, 0, 2, 3] = 1.0  # the most confident pixel is in the second image,
    scores[0, 0, 0, 0] = 0.5  # the second most confident in the first: k = 4*4 // 8 = 2 over the batch
    features = torch.zeros(2, 3, 4, 4)
    features[1, :, 2, 3] = torch.tensor([0.0, 3.0, 4.0])
    features[0, :, 0, 0] = torch.tensor([3.0, 0.0, 0.0])
    mean = torch.tensor([0.5 * 3.0, 3.0, 4.0]) / 1.5
    torch.testing.assert_close(prototypes(scores, features), (mean / mean.norm())[None])


def test_contrast_scores_and_pseudo_labels():
    maps = torch.tensor([[[[0.9, 0.9]], [[1.0, 3.0]], [[2.0, 0.5]]]])  # background first, 2 classes, 1x2
    labels = torch.tensor([[1.0, 1.0]])
    scores = contrast_scores(maps, labels)
    # class 1: min 1, max 3 -> entries within 1e-5 of the min zeroed, then (x - min - 1e-5) / (range + 1e-5)
    c1 = [(0 - 1 - 1e-5) / (2 + 1e-5), (3 - 1 - 1e-5) / (2 + 1e-5)]
    c2 = [(2 - 0.5 - 1e-5) / (1.5 + 1e-5), (0 - 0.5 - 1e-5) / (1.5 + 1e-5)]
    # The background score is the official --bg_threshold, 0.20.
    torch.testing.assert_close(scores[0, :, 0], torch.tensor([[0.2, 0.2], c1, c2]))
    assert pseudo_labels(scores, labels).tolist() == [2, 1]
    # An absent class scores 0 before the softmax, so the background (0.2) beats it.
    assert pseudo_labels(scores, torch.tensor([[0.0, 1.0]])).tolist() == [2, 0]
    assert contrast_scores(maps, labels, background=0.1)[0, 0].unique().tolist() == pytest.approx([0.1])


def _hand_nce(pixels: list[list[float]], protos: list[list[float]], targets: list[int]) -> float:
    total = 0.0
    for f, y in zip(pixels, targets, strict=True):
        logits = [sum(a * b for a, b in zip(f, p, strict=True)) / T for p in protos]
        total += -(logits[y] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(pixels)


def test_prototype_nce_by_hand():
    pixels = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    protos = [[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]
    targets = [0, 2, 1]
    value = prototype_nce(torch.tensor(pixels), torch.tensor(protos), torch.tensor(targets), T)
    assert float(value) == pytest.approx(_hand_nce(pixels, protos, targets), rel=1e-5)


def test_intra_view_nce_averages_over_classes_including_single_pixel_ones():
    # Class 0 has two identical pixels (so the random half does not matter), class 1 one pixel (it
    # counts in the class average but adds nothing, as in the official code).
    pixels = [[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]]
    protos = [[1.0, 0.0], [0.0, 1.0]]
    value = intra_view_nce(torch.tensor(pixels), torch.tensor(protos), torch.tensor([0, 0, 1]), T)
    expected = (_hand_nce(pixels[:1], protos, [0]) + 0.0) / 2
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_intra_view_nce_uses_hard_negatives_with_many_prototypes():
    c = HARD_END + 2
    protos = F.normalize(torch.randn(c, 8), dim=-1)
    pixel = F.normalize(protos[0] + torch.randn(8), dim=0)
    pixels = torch.stack([pixel, pixel])  # one class, two identical pixels
    value = float(intra_view_nce(pixels, protos, torch.tensor([0, 0]), T))
    logits = (pixels[0] @ protos.t() / T).tolist()
    ranked = sorted(range(c), key=lambda j: -logits[j])
    hard = ranked[3:HARD_END]  # the 4th to 13th most similar prototypes, plus the positive
    expected = math.log(math.exp(logits[0]) + sum(math.exp(logits[j]) for j in hard)) - logits[0]
    assert value == pytest.approx(expected, rel=1e-4)
    everything = math.log(sum(math.exp(v) for v in logits)) - logits[0]
    assert abs(value - everything) > 1e-2  # the hard set is not the plain softmax


def test_identical_views_make_cross_view_and_cross_label_terms_equal():
    maps = torch.rand(2, 3, 4, 4)
    features = torch.rand(2, 5, 4, 4)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    losses = ppc_losses(maps, maps, features, features, labels, gamma=0.1, contrast_size=None)
    assert set(losses) == {"ppc_cross_view", "ppc_cross_label", "ppc_intra_view"}
    assert float(losses["ppc_cross_view"]) == pytest.approx(float(losses["ppc_cross_label"]), rel=1e-6)
    scores = contrast_scores(maps, labels)
    f = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, 5), dim=-1)
    expected = 0.1 * prototype_nce(f, prototypes(scores, features), pseudo_labels(scores, labels))
    assert float(losses["ppc_cross_view"]) == pytest.approx(float(expected), rel=1e-5)


def official_contrast(
    cam_rv1_down: torch.Tensor,
    cam_rv2_down: torch.Tensor,
    f_proj1: torch.Tensor,
    f_proj2: torch.Tensor,
    fg_label: torch.Tensor,
    sample: Callable[[int], torch.Tensor],
    bg_threshold: float = 0.20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """usr922/wseg ``contrast_train.py`` lines 138-140 and 179-389, transcribed (from the official file).

    Changes: ``.cuda()`` dropped, the class count 21 read from the maps, ``random.sample(range(n),
    n // 2)`` replaced by ``sample(n)`` and the unused ``random_indices`` over the 21 prototypes
    (lines 290-291, 343-344) left out. Returns (loss_cross_nce, loss_cross_nce2, loss_intra_nce).
    """
    N = fg_label.shape[0]
    bg_score = torch.ones((N, 1))
    label = torch.cat((bg_score, fg_label), dim=1)
    label = label.unsqueeze(2).unsqueeze(3)
    n_classes = cam_rv1_down.shape[1]

    f_proj1 = F.interpolate(f_proj1, size=(128 // 8, 128 // 8), mode="bilinear", align_corners=True)
    cam_rv1_down = F.interpolate(cam_rv1_down, size=(128 // 8, 128 // 8), mode="bilinear", align_corners=True)
    cam_rv2_down = cam_rv2_down
    with torch.no_grad():
        fea1 = f_proj1.detach()
        c_fea1 = fea1.shape[1]
        cam_rv1_down = F.relu(cam_rv1_down.detach())
        n1, c1, h1, w1 = cam_rv1_down.shape
        max1 = torch.max(cam_rv1_down.view(n1, c1, -1), dim=-1)[0].view(n1, c1, 1, 1)
        min1 = torch.min(cam_rv1_down.view(n1, c1, -1), dim=-1)[0].view(n1, c1, 1, 1)
        cam_rv1_down[cam_rv1_down < min1 + 1e-5] = 0.0
        norm_cam1 = (cam_rv1_down - min1 - 1e-5) / (max1 - min1 + 1e-5)
        cam_rv1_down = norm_cam1
        cam_rv1_down[:, 0, :, :] = bg_threshold
        scores1 = F.softmax(cam_rv1_down * label, dim=1)
        pseudo_label1 = scores1.argmax(dim=1, keepdim=True)
        n_sc1, c_sc1, h_sc1, w_sc1 = scores1.shape
        fea1 = fea1.permute(0, 2, 3, 1).reshape(-1, c_fea1)
        top_values, top_indices = torch.topk(
            cam_rv1_down.transpose(0, 1).reshape(c_sc1, -1), k=h_sc1 * w_sc1 // 8, dim=-1
        )
        prototypes1 = torch.zeros(c_sc1, c_fea1)
        for i in range(c_sc1):
            top_fea = fea1[top_indices[i]]
            prototypes1[i] = torch.sum(top_values[i].unsqueeze(-1) * top_fea, dim=0) / torch.sum(
                top_values[i]
            )
        prototypes1 = F.normalize(prototypes1, dim=-1)

        fea2 = f_proj2.detach()
        c_fea2 = fea2.shape[1]
        cam_rv2_down = F.relu(cam_rv2_down.detach())
        n2, c2, h2, w2 = cam_rv2_down.shape
        max2 = torch.max(cam_rv2_down.view(n2, c2, -1), dim=-1)[0].view(n2, c2, 1, 1)
        min2 = torch.min(cam_rv2_down.view(n2, c2, -1), dim=-1)[0].view(n2, c2, 1, 1)
        cam_rv2_down[cam_rv2_down < min2 + 1e-5] = 0.0
        norm_cam2 = (cam_rv2_down - min2 - 1e-5) / (max2 - min2 + 1e-5)
        cam_rv2_down = norm_cam2
        cam_rv2_down[:, 0, :, :] = bg_threshold
        scores2 = F.softmax(cam_rv2_down * label, dim=1)
        pseudo_label2 = scores2.argmax(dim=1, keepdim=True)
        n_sc2, c_sc2, h_sc2, w_sc2 = scores2.shape
        fea2 = fea2.permute(0, 2, 3, 1).reshape(-1, c_fea2)
        top_values2, top_indices2 = torch.topk(
            cam_rv2_down.transpose(0, 1).reshape(c_sc2, -1), k=h_sc2 * w_sc2 // 8, dim=-1
        )
        prototypes2 = torch.zeros(c_sc2, c_fea2)
        for i in range(c_sc2):
            top_fea2 = fea2[top_indices2[i]]
            prototypes2[i] = torch.sum(top_values2[i].unsqueeze(-1) * top_fea2, dim=0) / torch.sum(
                top_values2[i]
            )
        prototypes2 = F.normalize(prototypes2, dim=-1)

    n_f, c_f, h_f, w_f = f_proj1.shape
    f_proj1 = f_proj1.permute(0, 2, 3, 1).reshape(n_f * h_f * w_f, c_f)
    f_proj1 = F.normalize(f_proj1, dim=-1)
    pseudo_label1 = pseudo_label1.reshape(-1)
    positives1 = prototypes2[pseudo_label1]
    negitives1 = prototypes2

    n_f, c_f, h_f, w_f = f_proj2.shape
    f_proj2 = f_proj2.permute(0, 2, 3, 1).reshape(n_f * h_f * w_f, c_f)
    f_proj2 = F.normalize(f_proj2, dim=-1)
    pseudo_label2 = pseudo_label2.reshape(-1)
    positives2 = prototypes1[pseudo_label2]
    negitives2 = prototypes1

    # 1.1 cross-prototype
    A1 = torch.exp(torch.sum(f_proj1 * positives1, dim=-1) / 0.1)
    A2 = torch.sum(torch.exp(torch.matmul(f_proj1, negitives1.transpose(0, 1)) / 0.1), dim=-1)
    loss_nce1 = torch.mean(-1 * torch.log(A1 / A2))
    A3 = torch.exp(torch.sum(f_proj2 * positives2, dim=-1) / 0.1)
    A4 = torch.sum(torch.exp(torch.matmul(f_proj2, negitives2.transpose(0, 1)) / 0.1), dim=-1)
    loss_nce2 = torch.mean(-1 * torch.log(A3 / A4))
    loss_cross_nce = 0.1 * (loss_nce1 + loss_nce2) / 2

    # 1.2 cross-pseudo-label
    A1_view1 = torch.exp(torch.sum(f_proj1 * positives2, dim=-1) / 0.1)
    A2_view1 = torch.sum(torch.exp(torch.matmul(f_proj1, negitives2.transpose(0, 1)) / 0.1), dim=-1)
    loss_cross_nce2_1 = torch.mean(-1 * torch.log(A1_view1 / A2_view1))
    A3_view2 = torch.exp(torch.sum(f_proj2 * positives1, dim=-1) / 0.1)
    A4_view2 = torch.sum(torch.exp(torch.matmul(f_proj2, negitives1.transpose(0, 1)) / 0.1), dim=-1)
    loss_cross_nce2_2 = torch.mean(-1 * torch.log(A3_view2 / A4_view2))
    loss_cross_nce2 = 0.1 * (loss_cross_nce2_1 + loss_cross_nce2_2) / 2

    # 2. intra-view, both views (lines 283-387, the second a copy of the first with view-2 tensors)
    def intra(f_proj, protos, pseudo_label):
        positives_intra = protos[pseudo_label]
        negitives_intra = protos
        similarity_intra = (torch.sum(f_proj * positives_intra, dim=-1) + 1) / 2.0
        A1_intra = torch.exp(torch.sum(f_proj * positives_intra, dim=-1) / 0.1)
        neg_scores = torch.matmul(f_proj, negitives_intra.transpose(0, 1))
        with torch.no_grad():
            _, lower_indices = torch.topk(neg_scores, k=13, largest=True, dim=-1)
            lower_indices = lower_indices[:, 3:]
        negitives_intra = negitives_intra.unsqueeze(0).repeat(n_f * h_f * w_f, 1, 1)
        lower_negitives_intra = negitives_intra[torch.arange(n_f * h_f * w_f).unsqueeze(1), lower_indices]
        negitives_intra = torch.cat([positives_intra.unsqueeze(1), lower_negitives_intra], dim=1)
        A2_intra = torch.sum(
            torch.exp(torch.matmul(f_proj.unsqueeze(1), negitives_intra.transpose(1, 2)).squeeze(1) / 0.1),
            dim=-1,
        )
        loss_intra_nce = torch.zeros(1)
        C = 0
        exists = np.unique(pseudo_label.numpy()).tolist()
        for i_ in range(n_classes):
            if i_ not in exists:
                continue
            C += 1
            A1_intra_class = A1_intra[pseudo_label == i_]
            A2_intra_class = A2_intra[pseudo_label == i_]
            similarity_intra_class = similarity_intra[pseudo_label == i_]
            len_class = A1_intra_class.shape[0]
            if len_class < 2:
                continue
            with torch.no_grad():
                random_indices = sample(len_class).long()
            random_A1_intra = A1_intra_class[random_indices]
            random_A2_intra = A2_intra_class[random_indices]
            with torch.no_grad():
                _, lower_indices = torch.topk(similarity_intra_class, k=int(len_class * 0.6), largest=False)
                lower_indices = lower_indices[int(len_class * 0.6) - len_class // 2 :]
            lower_A1_intra = A1_intra_class[lower_indices]
            lower_A2_intra = A2_intra_class[lower_indices]
            A1_intra_class = torch.cat([random_A1_intra, lower_A1_intra], dim=0).reshape(-1)
            A2_intra_class = torch.cat([random_A2_intra, lower_A2_intra], dim=0).reshape(-1)
            loss_intra_nce += torch.mean(-1 * torch.log(A1_intra_class / A2_intra_class))
        return loss_intra_nce / C

    loss_intra_nce = (
        0.1 * (intra(f_proj1, prototypes1, pseudo_label1) + intra(f_proj2, prototypes2, pseudo_label2)) / 2
    )
    return loss_cross_nce, loss_cross_nce2, loss_intra_nce


def _official_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """VOC-sized fixed inputs: 21 channels (background first), a 24x20 first view, the 16x16 second."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(2, 21, 24, 20, generator=gen) + 0.5
    scaled_maps = torch.randn(2, 21, 16, 16, generator=gen) + 0.5
    features = F.relu(torch.randn(2, 32, 24, 20, generator=gen))  # projected features: rectified
    scaled_features = F.relu(torch.randn(2, 32, 16, 16, generator=gen))
    labels = (torch.rand(2, 20, generator=gen) < 0.3).float()
    labels[:, 0] = 1.0
    return maps, scaled_maps, features, scaled_features, labels


def test_default_losses_match_the_official_transcription():
    maps, scaled_maps, features, scaled_features, labels = _official_inputs()
    losses = ppc_losses(
        maps, scaled_maps, features, scaled_features, labels, generator=torch.Generator().manual_seed(7)
    )
    draws = torch.Generator().manual_seed(7)
    cross, cross_label, intra = official_contrast(
        maps.clone(),
        scaled_maps.clone(),
        features.clone(),
        scaled_features.clone(),
        labels,
        sample=lambda n: torch.randperm(n, generator=draws)[: n // 2],
    )
    assert float(losses["ppc_cross_view"]) == pytest.approx(float(cross), rel=1e-5)
    assert float(losses["ppc_cross_label"]) == pytest.approx(float(cross_label), rel=1e-5)
    assert float(losses["ppc_intra_view"]) == pytest.approx(float(intra), rel=1e-5)
    # Either EPS+saliency constant (an option) moves the terms far beyond the tolerance above.
    for option in ({"background": 0.1}, {"top_share": 16}):
        other = ppc_losses(
            maps,
            scaled_maps,
            features,
            scaled_features,
            labels,
            generator=torch.Generator().manual_seed(7),
            **option,
        )
        assert max(abs(float(other[k]) / float(losses[k]) - 1) for k in losses) > 1e-3, option


def test_losses_keep_the_gradient_path_of_the_official_code():
    # Prototypes and pseudo-labels are detached; the pixel features of both views carry the gradient.
    maps, scaled_maps, features, scaled_features, labels = _official_inputs(1)
    features.requires_grad_(True)
    scaled_features.requires_grad_(True)
    losses = ppc_losses(maps, scaled_maps, features, scaled_features, labels)
    official = official_contrast(
        maps, scaled_maps, features, scaled_features, labels, sample=lambda n: torch.arange(n // 2)
    )
    ours = torch.autograd.grad(
        losses["ppc_cross_view"] + losses["ppc_cross_label"], (features, scaled_features)
    )
    theirs = torch.autograd.grad(official[0] + official[1], (features, scaled_features))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_coarser_second_view_is_resized_to_the_official_grid():
    # At output stride 16 the 128x128 view has 8x8 features; they meet the first view on 16x16.
    maps, _, features, _, labels = _official_inputs(2)
    gen = torch.Generator().manual_seed(3)
    small_maps, small_features = (
        torch.randn(2, 21, 8, 8, generator=gen),
        torch.rand(2, 32, 8, 8, generator=gen),
    )

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True)

    coarse = ppc_losses(maps, small_maps, features, small_features, labels)
    resized = ppc_losses(maps, up(small_maps), features, up(small_features), labels)
    for key in ("ppc_cross_view", "ppc_cross_label"):
        assert float(coarse[key]) == pytest.approx(float(resized[key]), rel=1e-6)


def test_official_defaults_and_views():
    method = create_method("ppc")
    assert isinstance(method, Ppc)
    assert (method.background_score, method.top_share, method.gamma) == (0.2, 8, 0.1)
    assert (method.second_view_size, method.contrast_size) == (128, 16)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random").eval()
    modules = method.build_modules(model)
    assert modules["projection"].conv.out_channels == 128 and modules["projection"].conv.bias is None
    image = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        views = method.views(model, modules, image, method.forward(model, modules, {"image": image}))
        seam = Ppc(second_view_size=None)
        seam_views = seam.views(model, modules, image, seam.forward(model, modules, {"image": image}))
    assert views.scaled_image.shape[-2:] == (128, 128)
    torch.testing.assert_close(
        views.scaled_image, F.interpolate(image, size=(128, 128), mode="bilinear", align_corners=True)
    )
    assert seam_views.scaled_image.shape[-2:] == (12, 14)  # SEAM's x0.3 copy
    with pytest.raises(ValueError, match="top_share"):
        Ppc(top_share=0)
    with pytest.raises(ValueError, match="second_view_size"):
        Ppc(second_view_size=-1)


def test_two_training_steps_train_the_projection_head():
    method = create_method("ppc")
    task, logged, initial = train_steps(method)
    for name in (
        "train/er",
        "train/ecr",
        "train/ppc_cross_view",
        "train/ppc_cross_label",
        "train/ppc_intra_view",
    ):
        assert name in logged and math.isfinite(logged[name]), name
    assert changed(task, initial, "projection") and changed(task, initial, "pcm")
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0,))
    assert isinstance(extractor, PcmCamExtractor)
    assert extractor(torch.randn(3, 32, 40)).shape == (2, 32, 40)
    # contrast_infer.py, lines 75-80, on the summed maps (min-max per class):
    sum_cam = (np.random.default_rng(0).random((2, 4, 5)) + 0.5).astype(np.float32)
    official = sum_cam.copy()
    official[official < 0] = 0
    cam_max = np.max(official, (1, 2), keepdims=True)
    cam_min = np.min(official, (1, 2), keepdims=True)
    official[official < cam_min + 1e-5] = 0
    official = (official - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)
    normalised = extractor.normalize(torch.from_numpy(sum_cam)).numpy()
    # the official minimum pixels turn slightly negative (below any background score); here they are 0
    np.testing.assert_allclose(normalised, np.maximum(official, 0), atol=1e-6)
