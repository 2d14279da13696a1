"""seed-probe: a linear pixel classifier on a stride-8 stage, fitted on the training split's CAM seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from probe_setup import TWO, WITH_BACKGROUND, Plain, cached_context, ready, tiny_model
from torch.nn import functional as F

from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.seed_probe import PixelProbe, SeedProbe, fit_probe
from wsss_domains.models.stages import capture_stages, stage_at_stride


def test_registered_and_options_checked():
    assert "seed-probe" in list_methods()
    assert SeedProbe.fits_training_split
    for bad in ({"seed_fraction": 0}, {"fuse_weight": 1.5}, {"steps": 0}, {"fit_images": 0}):
        with pytest.raises(ValueError, match="seed-probe"):
            create_method("seed-probe", **bad)


def test_the_probe_stage_is_chosen_by_stride():
    model = tiny_model()
    assert stage_at_stride(model.backbone, 8) == 2  # test_efficientnet: strides 2, 4, 8, 16, 16
    with pytest.raises(ValueError, match="no stage of stride 3"):
        stage_at_stride(model.backbone, 3)


def test_fit_probe_separates_a_linear_problem_and_balances_rare_classes():
    generator = torch.Generator().manual_seed(0)
    # Class 1 is rare (5%) and lies where feature 0 is high; feature 1 is noise on another scale.
    n = 2000
    features = torch.randn(n, 2, generator=generator) * torch.tensor([1.0, 50.0])
    targets = (features[:, 0] > 1.6).long()
    probe = fit_probe(features, targets, 2, steps=200)
    predicted = probe(features[:, :, None, None])[:, :, 0, 0].argmax(1)
    recall_rare = (predicted[targets == 1] == 1).float().mean()
    assert recall_rare > 0.95  # unbalanced loss would trade the rare class away
    assert (predicted == targets).float().mean() > 0.9
    with pytest.raises(ValueError, match="no seed pixels"):
        fit_probe(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 2)


def test_seed_targets_add_low_cam_background_seeds_in_threshold_domains():
    method = SeedProbe(seed_fraction=0.5)

    class Threshold(Plain):
        def background_threshold(self, label_space: object) -> float:
            return 0.3

    cams = torch.tensor([[[0.9, 0.8, 0.2, 0.1]], [[0.0, 0.0, 0.0, 0.0]]])  # a left, background right
    present = torch.tensor([1.0, 0.0])
    seeds = method.seed_targets(cams, present, Threshold(), WITH_BACKGROUND, None)
    assert seeds.shape == (3, 1, 4)  # a, b, background
    # a: pixels 0 and 1 are labelled a; the 0.5 quantile of (0.9, 0.8, 0.2, 0.1) is 0.5 -> both.
    assert seeds[0].tolist() == [[True, True, False, False]]
    assert not seeds[1].any()
    # Background: labelled pixels 2 and 3; their highest CAM in the bottom half (<= 0.5) -> both.
    assert seeds[2].tolist() == [[False, False, True, True]]
    # Without a threshold background there is no extra channel.
    assert method.seed_targets(cams, present, Plain(), TWO, None).shape == (2, 1, 4)


def test_refine_fuses_the_probes_softmax_over_present_classes():
    model = tiny_model()
    method = create_method("seed-probe", fuse_weight=0.5, stride=8)
    ready(method, model)
    dim = model.backbone.feature_info[2]["num_chs"]
    torch.manual_seed(1)
    method.probe = PixelProbe(torch.randn(dim), torch.rand(dim) + 0.5, 2)
    method.seen = torch.tensor([True, True])
    image = torch.rand(3, 64, 64)
    cams = torch.rand(2, 64, 64)
    cams = cams / cams.amax((1, 2), keepdim=True)
    present = torch.tensor([1.0, 1.0])
    out = method.refine(cams, RefineContext.of(image, present, Plain(), TWO))

    # By hand: stride-8 stage features, standardised, linear, softmax, upsampled, fused, re-normalised.
    x = ((image - 0.5) / 0.25)[None]
    with capture_stages(model.backbone, [2]) as stages:
        model.features(x)
    feats = stages[0][0]
    z = (feats.permute(1, 2, 0) - method.probe.mean) / method.probe.std
    logits = (z @ method.probe.linear.weight.T + method.probe.linear.bias).permute(2, 0, 1)
    probs = F.interpolate(logits.softmax(0)[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    fused = 0.5 * cams + 0.5 * probs.clamp(0, 1)
    expected = fused / fused.amax((1, 2), keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)

    # One present class: its probability is 1 everywhere; the absent class is left alone.
    only_a = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 0.0]), Plain(), TWO))
    assert torch.equal(only_a[1], cams[1])
    a = 0.5 * cams[0] + 0.5
    assert torch.allclose(only_a[0], a / a.max(), atol=1e-6)
    # A class the probe never saw seeds of keeps its CAM.
    method.seen = torch.tensor([True, False])
    unseen = method.refine(cams, RefineContext.of(image, present, Plain(), TWO))
    assert torch.equal(unseen[1], cams[1]) and not torch.equal(unseen[0], cams[0])


def test_several_strides_are_concatenated_on_the_finest_grid():
    model = tiny_model()
    method = create_method("seed-probe", stride="4,8")
    ready(method, model)
    image = torch.rand(3, 64, 64)
    feats = method._features(image, Plain())
    x = ((image - 0.5) / 0.25)[None]
    with capture_stages(model.backbone, [1, 2]) as stages:
        model.features(x)
    fine, coarse = stages
    assert feats.shape == (1, fine.shape[1] + coarse.shape[1], 16, 16)  # stride 4 of 64 px
    assert torch.allclose(feats[:, : fine.shape[1]], fine, atol=1e-6)
    up = F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(feats[:, fine.shape[1] :], up, atol=1e-6)
    assert create_method("seed-probe").strides == (4, 8)  # the default
    assert create_method("seed-probe", stride=[8]).strides == (8,)
    for bad in ("a,b", "0", ""):
        with pytest.raises(ValueError, match="stride"):
            create_method("seed-probe", stride=bad)


def test_refine_before_fit_is_an_error():
    method = create_method("seed-probe")
    ready(method, tiny_model())
    with pytest.raises(RuntimeError, match="fit"):
        method.refine(
            torch.rand(2, 32, 32), RefineContext.of(torch.rand(3, 32, 32), torch.ones(2), Plain(), TWO)
        )


def _split(n: int = 6) -> list[dict]:
    """In-memory training samples: a bright left half labelled a, the rest b."""
    torch.manual_seed(2)
    samples = []
    for i in range(n):
        image = torch.rand(3, 64, 64) * 0.2
        image[0, :, :32] += 0.7
        samples.append({"image": image, "label": torch.tensor([1.0, 1.0 if i % 2 else 0.0]), "id": str(i)})
    return samples


def test_fit_collects_seeds_of_the_training_split_and_caches_the_probe(tmp_path: Path, monkeypatch):
    model = tiny_model()
    method = create_method("seed-probe", fit_images=4, pixels_per_image=16, steps=20)
    extractor = ready(method, model)
    context = cached_context(_split(), extractor, tmp_path)
    features, targets = method.collect_seeds(context)
    dim = model.backbone.feature_info[1]["num_chs"] + model.backbone.feature_info[2]["num_chs"]
    assert features.shape[1] == dim and features.shape[0] == targets.numel()
    # Four of the six samples; per sample and class at most 16 cells; b only in odd samples.
    assert targets.numel() <= 4 * 2 * 16 and set(targets.tolist()) <= {0, 1}
    method.fit(context)
    cached = list(tmp_path.glob("seed-probe-*.pt"))
    assert len(cached) == 1
    assert method.seen is not None and bool(method.seen[0])

    # A second job with the same options loads the probe instead of fitting again.
    again = create_method("seed-probe", fit_images=4, pixels_per_image=16, steps=20)
    ready(again, model)
    monkeypatch.setattr(SeedProbe, "collect_seeds", lambda *_: pytest.fail("fitted again"))
    again.fit(context)
    assert again.probe is not None and method.probe is not None
    assert torch.equal(again.probe.linear.weight, method.probe.linear.weight)
    assert torch.equal(again.seen, method.seen)
    # Other options are another cache entry.
    other = create_method("seed-probe", fit_images=4, pixels_per_image=16, steps=21)
    assert context.cache_path("seed-probe", {"steps": 21}) != cached[0]
    ready(other, model)
    monkeypatch.undo()
    other.fit(context)
    assert len(list(tmp_path.glob("seed-probe-*.pt"))) == 2


def test_a_chain_fits_its_fitting_part():
    chain = create_method("cam-proto+seed-probe")
    assert chain.fits_training_split
    assert not create_method("cam-proto+random-walk").fits_training_split
