"""cam-proto: image-specific prototypes of an intermediate stage, seeded by confident CAM pixels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import fakes  # noqa: E402

from wsss_domains.domains.contract import DomainPlugin, LabelSpace  # noqa: E402
from wsss_domains.methods import create_method, list_methods  # noqa: E402
from wsss_domains.methods.base import RefineContext  # noqa: E402
from wsss_domains.methods.cam_proto import confident_seeds  # noqa: E402
from wsss_domains.models.classifier import CamClassifier  # noqa: E402
from wsss_domains.models.stages import capture_stages  # noqa: E402

TWO = LabelSpace(classes=("a", "b"), palette=((255, 0, 0), (0, 0, 255)))


class Plain(DomainPlugin):
    name = "plain"

    def datasets(self):  # pragma: no cover - not used
        return {}


def test_registered():
    assert "cam-proto" in list_methods()
    with pytest.raises(ValueError, match="seed_fraction"):
        create_method("cam-proto", seed_fraction=0)
    with pytest.raises(ValueError, match="fuse_weight"):
        create_method("cam-proto", fuse_weight=1.5)


def test_seeds_are_the_top_share_of_each_class_among_its_labelled_pixels():
    cams = torch.tensor([[[0.9, 0.8, 0.1, 0.0]], [[0.0, 0.1, 0.6, 0.7]]])  # K=2, 1x4
    labels = torch.tensor([[0, 0, 1, 1]])
    scored = torch.ones(1, 4, dtype=torch.bool)
    seeds = confident_seeds(cams, labels, scored, seed_fraction=0.25)
    # Class a: the 0.75 quantile of (0.9, 0.8, 0.1, 0.0) is 0.825 -> pixel 0 only.
    # Class b: the 0.75 quantile of (0.0, 0.1, 0.6, 0.7) is 0.625 -> pixel 3 only.
    assert seeds[0].tolist() == [[True, False, False, False]]
    assert seeds[1].tolist() == [[False, False, False, True]]
    # Unscored pixels neither vote in the quantile nor become seeds; a class whose labelled
    # pixels all fall below its threshold keeps them all.
    scored = torch.tensor([[True, True, True, False]])
    seeds = confident_seeds(cams, labels, scored, seed_fraction=0.25)
    assert seeds[1].tolist() == [[False, False, True, False]]
    labels = torch.tensor([[0, 0, 0, 1]])
    seeds = confident_seeds(cams, labels, torch.ones(1, 4, dtype=torch.bool), seed_fraction=0.25)
    assert seeds[1].tolist() == [[False, False, False, True]]


def test_refine_fuses_the_cosine_prototype_maps_of_the_chosen_stage():
    torch.manual_seed(0)
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    method = create_method("cam-proto", fuse_weight=0.5, seed_fraction=0.25, stage=-2)
    method.setup(Plain(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    method.extractor(model, method.build_modules(model), scales=(1.0,), flip=False)
    image = torch.rand(3, 64, 64)
    cams = torch.zeros(2, 64, 64)
    cams[0, :, :32] = torch.linspace(0.2, 1.0, 32)  # class a on the left, brightest at x = 31
    cams[1, :, 32:] = 1.0
    present = torch.tensor([1.0, 1.0])
    out = method.refine(cams, RefineContext.of(image, present, Plain(), TWO))

    # By hand: stage features, seeds, masked means, ReLU cosine / max, fused and re-normalised.
    x = ((image - 0.5) / 0.25)[None]
    with capture_stages(model.backbone, [-2]) as stages:
        model.features(x)
    feats = stages[0][0]
    seeds = torch.zeros(2, 64, 64)
    seeds[0, :, 16:32] = 1  # a's top quarter over the image: its 0.75 quantile is its left half's median
    seeds[1, :, 32:] = 1  # b's map is flat at 1: every b pixel reaches its quantile
    weights = F.interpolate(seeds[None], size=feats.shape[-2:], mode="area")[0]
    protos = torch.einsum("khw,dhw->kd", weights, feats) / weights.sum((1, 2))[:, None]
    sim = torch.einsum("dhw,kd->khw", F.normalize(feats, dim=0), F.normalize(protos, dim=1)).relu()
    proto = sim / sim.amax((1, 2), keepdim=True)
    proto = F.interpolate(proto[None], size=(64, 64), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    fused = 0.5 * cams + 0.5 * proto
    expected = fused / fused.amax((1, 2), keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)

    # Absent classes are left alone; fuse_weight 0 is plain CAM.
    only_a = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 0.0]), Plain(), TWO))
    assert torch.equal(only_a[1], cams[1]) and not torch.allclose(only_a[0], cams[0])
    off = create_method("cam-proto", fuse_weight=0.0)
    assert torch.equal(off.refine(cams, RefineContext.of(image, present, Plain(), TWO)), cams)
