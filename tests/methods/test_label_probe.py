"""label-probe: a linear pixel classifier fitted by multiple-instance learning on image-level labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from probe_setup import MEAN, STD, TWO, WITH_BACKGROUND, Plain, cached_context, ready, tiny_model
from torch.nn import functional as F

from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.fitting import FitContext
from wsss_domains.methods.label_probe import (
    LabelProbe,
    fit_mil_probe,
    mil_loss,
    optical_density,
    top_mean,
)
from wsss_domains.methods.stage_probe import PixelProbe


def test_registered_and_options_checked():
    assert "label-probe" in list_methods()
    assert LabelProbe.fits_training_split
    for bad in ({"top_fraction": 0}, {"fuse_weight": -0.1}, {"steps": 0}, {"fit_images": 0}, {"grid": 6}):
        with pytest.raises(ValueError, match="label-probe"):
            create_method("label-probe", **bad)
    assert create_method("cam-proto+label-probe").fits_training_split


def test_top_mean_averages_the_highest_valid_cells():
    maps = torch.tensor([[[[0.1, 0.9], [0.5, 0.7]]]])  # 1 x 1 x 2 x 2
    valid = torch.tensor([[[True, False], [True, True]]])  # 0.9 is not part of the bag
    assert torch.allclose(top_mean(maps, valid, 0.7), torch.tensor([[0.6]]))  # 2.1 of 3 cells -> the top 2
    assert torch.allclose(top_mean(maps, valid, 0.01), torch.tensor([[0.7]]))  # at least one cell
    assert torch.allclose(top_mean(maps, valid, 1.0), torch.tensor([[1.3 / 3]]))


def test_mil_loss_rewards_absent_classes_out_and_present_ones_somewhere():
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    labels = torch.tensor([[1.0, 0.0]])  # only a present
    all_a = torch.zeros(1, 2, 2, 2)
    all_a[:, 0] = 5.0
    all_b = torch.zeros(1, 2, 2, 2)
    all_b[:, 1] = 5.0
    assert mil_loss(all_a, labels, valid, 0.25) < 0.05 < mil_loss(all_b, labels, valid, 0.25)
    # Both present: one cell of b is enough, and it costs nothing on a's side.
    both = torch.tensor([[1.0, 1.0]])
    one_b = all_a.clone()
    one_b[0, :, 0, 0] = torch.tensor([0.0, 5.0])
    assert mil_loss(one_b, both, valid, 0.25) < mil_loss(all_a, both, valid, 0.25)
    # Padded cells do not count.
    half = torch.tensor([[[True, True], [False, False]]])
    padded = all_a.clone()
    padded[0, :, 1] = torch.tensor([0.0, 5.0])[:, None]
    assert torch.allclose(mil_loss(padded, labels, half, 0.25), mil_loss(all_a, labels, valid, 0.25))


def test_fit_mil_probe_learns_a_class_only_seen_beside_another():
    """b never appears alone: the probe must find it as what a-only bags lack."""
    generator = torch.Generator().manual_seed(0)
    bags, labels = [], []
    for i in range(60):
        feats = torch.randn(2, 8, 8, generator=generator) * 0.3
        if i % 2:  # a and b: the left half of the bag is b, where feature 0 is high
            feats[0, :, :4] += 2.0
            labels.append([1.0, 1.0])
        else:
            labels.append([1.0, 0.0])
        bags.append(feats)
    x, y = torch.stack(bags), torch.tensor(labels)
    valid = torch.ones(60, 8, 8, dtype=torch.bool)
    probe = fit_mil_probe(x, y, valid, fraction=0.1, steps=400)
    predicted = probe(x[1:2])[0].argmax(0)  # a two-class bag
    assert (predicted[:, :4] == 1).float().mean() > 0.9
    assert (predicted[:, 4:] == 0).float().mean() > 0.9
    with pytest.raises(ValueError, match="no valid cells"):
        fit_mil_probe(x[:1], y[:1], torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bags"):
        fit_mil_probe(x[0], y, valid)


def test_optical_density_features_are_blurred_minus_log_rgb():
    image = torch.full((3, 8, 8), 0.5)
    image[:, :, :4] = 1.0  # white glass: density 0
    od = optical_density(image, (4, 4), blurs=(1, 3))
    assert od.shape == (1, 6, 4, 4)
    assert torch.allclose(od[0, :3, :, :2], torch.zeros(3, 4, 2))
    assert torch.allclose(od[0, :3, :, 2:], torch.full((3, 4, 2), -torch.log(torch.tensor(0.5))))
    assert 0 < od[0, 3, 0, 1] < od[0, 0, 0, 2]  # the blur mixes in the white side


def test_features_are_stages_and_colour_on_the_grid():
    model = tiny_model()
    method = create_method("label-probe", stride="4,8", grid=8)
    ready(method, model)
    feats = method._features(torch.rand(3, 64, 64), Plain())
    dims = model.backbone.feature_info[1]["num_chs"] + model.backbone.feature_info[2]["num_chs"]
    assert feats.shape == (1, dims + 12, 8, 8)  # 4 blurs x 3 colours, stride-8 grid of 64 px
    fine = create_method("label-probe", grid=4)
    ready(fine, model)
    assert fine._features(torch.rand(3, 64, 64), Plain()).shape[-2:] == (16, 16)


def test_refine_fuses_probabilities_without_renormalising():
    model = tiny_model()
    method = create_method("label-probe", fuse_weight=0.5)
    ready(method, model)
    image = torch.rand(3, 64, 64)
    dim = method._features(image, Plain()).shape[1]
    torch.manual_seed(1)
    method.probe = PixelProbe(torch.randn(dim), torch.rand(dim) + 0.5, 2)
    method.seen = torch.tensor([True, True])
    cams = torch.rand(2, 64, 64)
    out = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 1.0]), Plain(), TWO))
    logits = method.probe(method._features(image, Plain()))[0]
    probs = F.interpolate(logits.softmax(0)[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(out, 0.5 * cams + 0.5 * probs, atol=1e-5)
    # An absent class keeps its CAM; a lone present class gets probability 1 everywhere.
    only_a = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 0.0]), Plain(), TWO))
    assert torch.equal(only_a[1], cams[1])
    assert torch.allclose(only_a[0], 0.5 * cams[0] + 0.5, atol=1e-6)


def _windows(n: int = 6) -> list[dict]:
    """Labelled windows: a bright-red left half is a (always present), the rest b in odd windows."""
    torch.manual_seed(2)
    samples = []
    for i in range(n):
        image = torch.rand(3, 64, 64) * 0.2 + 0.1
        image[0, :, :32] += 0.7
        exclude = torch.zeros(64, 64, dtype=torch.bool)
        exclude[:8] = True  # glass the bags must leave out
        label = torch.tensor([1.0, 1.0 if i % 2 else 0.0])
        samples.append({"image": image, "label": label, "exclude": exclude, "id": str(i)})
    return samples


def test_fit_uses_the_windows_when_there_are_some_and_caches(tmp_path: Path, monkeypatch):
    model = tiny_model()
    method = create_method("label-probe", steps=20)
    extractor = ready(method, model)
    built = []

    def factory():
        built.append(True)
        return _windows(6)

    context = cached_context(_windows(2), extractor, tmp_path, window_factory=factory)
    bags, labels, valid = method.collect_bags(context)
    assert bags.shape[0] == labels.shape[0] == valid.shape[0] == 6 and built == [True]
    assert not valid[:, 0].any() and valid[:, -1].all()  # the excluded top rows are not cells
    method.fit(context)
    assert len(list(tmp_path.glob("label-probe-*.pt"))) == 1 and built == [True]  # built once
    assert method.seen is not None and method.seen.tolist() == [True, True]

    again = create_method("label-probe", steps=20)
    ready(again, model)
    monkeypatch.setattr(LabelProbe, "collect_bags", lambda *_: pytest.fail("fitted again"))
    again.fit(context)
    assert torch.equal(again.probe.linear.weight, method.probe.linear.weight)

    # Without windows the training samples themselves are the bags (another cache entry).
    monkeypatch.undo()
    plain = FitContext(
        dataset=_windows(2), extractor=extractor, domain=Plain(), label_space=TWO, mean=MEAN, std=STD
    )
    assert plain.windows is None
    assert method.collect_bags(plain)[0].shape[0] == 2


def test_threshold_domains_add_an_always_present_background_output():
    model = tiny_model()
    method = create_method("label-probe", steps=5)
    extractor = ready(method, model)
    samples = _windows(2)  # labels over the foreground classes a, b
    context = FitContext(
        dataset=samples, extractor=extractor, domain=Plain(), label_space=WITH_BACKGROUND, mean=MEAN, std=STD
    )
    _, labels, _ = method.collect_bags(context)
    assert labels.shape[1] == 3 and labels[:, -1].tolist() == [1.0, 1.0]


def test_many_bags_are_fitted_in_random_batches_with_the_same_result_in_kind():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, 4, 4, generator=generator) * 0.3
    y = torch.zeros(40, 2)
    y[:, 0] = 1
    y[1::2, 1] = 1
    x[1::2, 0, :, :2] += 2.0  # b on the left of the two-class bags
    valid = torch.ones(40, 4, 4, dtype=torch.bool)
    full = fit_mil_probe(x, y, valid, fraction=0.5, steps=300)
    batched = fit_mil_probe(x, y, valid, fraction=0.5, steps=300, batch=8)
    truth = torch.zeros(20, 4, 4, dtype=torch.long)
    truth[:, :, :2] = 1
    for probe in (full, batched):
        predicted = probe(x[1::2]).argmax(1)
        assert (predicted == truth).float().mean() > 0.9
    assert not torch.equal(full.linear.weight, batched.linear.weight)
