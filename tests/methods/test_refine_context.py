"""Refinements get the engine's effective background threshold, exclude mask and classifier input."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import fakes  # noqa: E402

from wsss_domains.cam.extract import CamExtractor  # noqa: E402
from wsss_domains.domains.contract import DomainPlugin, LabelSpace  # noqa: E402
from wsss_domains.methods import create_method  # noqa: E402
from wsss_domains.methods.base import Method, RefineContext  # noqa: E402
from wsss_domains.models.classifier import CamClassifier  # noqa: E402
from wsss_domains.pseudo_labels.writer import PseudoLabelOptions, write_pseudo_labels  # noqa: E402
from wsss_domains.training.data import normalize  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TWO = LabelSpace(classes=("a", "b"), palette=((255, 0, 0), (0, 0, 255)))


class Recording(Method):
    name = "test-recording"
    contexts: list[RefineContext | None] = []
    label_contexts: list[RefineContext | None] = []

    def refine(self, cams, context):
        Recording.contexts.append(context)
        return cams

    def refine_labels(self, labels, cams, context):
        Recording.label_contexts.append(context)
        return labels


def test_the_writer_hands_both_hooks_the_threshold_it_applies_and_the_classifier_input(tmp_path):
    root = fakes.write_shapes(tmp_path / "data", n_train=1, n_val=2, n_unlabelled=0)
    val = fakes.build(root, "val")
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    domain = fakes.FakeDomain()
    Recording.contexts.clear()
    Recording.label_contexts.clear()
    options = PseudoLabelOptions(overlays=False, bg_threshold=0.37)  # the user's --bg-threshold
    write_pseudo_labels(
        val,
        CamExtractor(model, scales=(1.0,)),
        Recording(),
        domain,
        fakes.LABEL_SPACE,
        MEAN,
        STD,
        tmp_path / "o",
        options,
    )
    assert len(Recording.contexts) == len(Recording.label_contexts) == 2
    for k, (context, same) in enumerate(zip(Recording.contexts, Recording.label_contexts, strict=True)):
        assert context is same
        assert context.bg_threshold == 0.37  # not the domain's default
        raw = val[k]["image"]
        assert torch.equal(context.image, raw) and torch.equal(context.present, val[k]["label"])
        assert torch.equal(context.prepared, domain.preprocess(raw))
        assert torch.allclose(context.normalized, normalize(domain.preprocess(raw), MEAN, STD))
        rule = domain.exclude_mask(raw, fakes.LABEL_SPACE)  # no loader mask here: the domain's rule
        assert context.exclude is rule or torch.equal(context.exclude, rule)


class Plain(DomainPlugin):
    name = "plain"

    def datasets(self):  # pragma: no cover - not used
        return {}


def test_cam_proto_seeds_only_where_the_engines_exclude_mask_allows():
    torch.manual_seed(0)
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    method = create_method("cam-proto", fuse_weight=0.5, seed_fraction=0.25)
    method.setup(Plain(), MEAN, STD)
    method.extractor(model, method.build_modules(model), scales=(1.0,), flip=False)
    image = torch.rand(3, 64, 64)
    cams = torch.zeros(2, 64, 64)
    cams[0, :, :32] = torch.linspace(0.2, 1.0, 32)
    cams[1, :, 32:] = 1.0
    present = torch.ones(2)
    refined = method.refine(cams, RefineContext.of(image, present, Plain(), TWO))  # nothing excluded
    assert not torch.allclose(refined, cams)
    # A loader's or raster's no-data mask covering the whole image leaves no seed: nothing to fuse.
    everything = RefineContext.of(image, present, Plain(), TWO, exclude=torch.ones(64, 64, dtype=torch.bool))
    assert torch.equal(method.refine(cams, everything), cams)
    # ... and the classifier input handed over is used as is (no second preprocessing).
    given = normalize(image, MEAN, STD)
    context = RefineContext.of(image, present, Plain(), TWO, normalized=given)
    assert torch.allclose(method.refine(cams, context), refined, atol=1e-6)
