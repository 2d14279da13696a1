"""The ``crf`` method in a threshold-background domain: the engine keeps the CRF's background."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pydensecrf.densecrf")

from wsss_domains.domains import create_domain  # noqa: E402
from wsss_domains.methods import create_method  # noqa: E402
from wsss_domains.methods.base import RefineContext  # noqa: E402
from wsss_domains.methods.refinement import threshold_scores  # noqa: E402
from wsss_domains.pseudo_labels.assemble import cams_to_labels  # noqa: E402
from wsss_domains.refine.crf import DenseCRFRefiner  # noqa: E402


def _voc_style(h: int = 48, w: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A red object on green grass, and a blob-shaped CAM that covers most of it and spills over."""
    gen = torch.Generator().manual_seed(0)
    image = torch.empty(3, h, w)
    image[:] = torch.tensor([0.2, 0.5, 0.2]).view(3, 1, 1)
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[12:36, 16:48] = True
    image[:, obj] = torch.tensor([0.8, 0.1, 0.1]).view(3, 1)
    image = (image + 0.03 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cam = torch.exp(-(((yy - 24) / 14.0) ** 2 + ((xx - 32) / 20.0) ** 2))
    return image, cam / cam.max(), obj


def test_crf_on_a_one_class_voc_image_keeps_background():
    domain = create_domain("voc")
    space = domain.dataset("voc2012").label_space
    threshold = domain.background_threshold(space)
    image, cam, obj = _voc_style()
    cat = space.foreground_names.index("cat")
    present = torch.zeros(len(space.foreground))
    present[cat] = 1.0
    cams = torch.zeros(len(space.foreground), *cam.shape)
    cams[cat] = cam

    refined = create_method("crf").refine(cams, RefineContext.of(image, present, domain, space))
    labels = cams_to_labels(refined, present, space, threshold)
    background = labels == space.background_index
    assert background.float().mean() > 0.5  # the old softmax over one class labelled every pixel 'cat'
    assert torch.equal(~background, obj)  # and the CRF snaps the blob to the object's edges
    # The engine's threshold rule reads the CRF's own decision.
    marginals = DenseCRFRefiner()(image, cam[None], bg_threshold=threshold)
    assert torch.equal(background, marginals.argmax(0) == 0)


def test_threshold_scores_cross_the_threshold_where_the_marginals_tie():
    t = 0.3
    marginals = torch.tensor([[0.5, 0.6, 0.2, 0.0], [0.5, 0.4, 0.3, 0.0], [0.0, 0.0, 0.5, 1.0]]).view(3, 1, 4)
    scores = threshold_scores(marginals, t)
    assert scores.shape == (2, 1, 4) and (scores >= 0).all() and (scores <= 1).all()
    assert scores[0, 0, 0] == pytest.approx(t)  # tie -> exactly the threshold (background wins ties)
    labels = torch.cat([torch.full((1, 1, 4), t), scores]).argmax(0)
    assert torch.equal(labels, marginals.argmax(0))
