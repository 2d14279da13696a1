"""What the pixel-probe tests (seed-probe, label-probe) share: label spaces, a plain domain, a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import fakes  # noqa: E402

from wsss_domains.cam.extract import CamExtractor  # noqa: E402
from wsss_domains.domains.contract import BackgroundMode, DomainPlugin, LabelSpace  # noqa: E402
from wsss_domains.methods.base import Method  # noqa: E402
from wsss_domains.methods.fitting import FitContext, extractor_settings  # noqa: E402
from wsss_domains.models.classifier import CamClassifier  # noqa: E402

TWO = LabelSpace(classes=("a", "b"), palette=((255, 0, 0), (0, 0, 255)))
WITH_BACKGROUND = LabelSpace(
    classes=("background", "a", "b"),
    palette=((0, 0, 0), (255, 0, 0), (0, 0, 255)),
    background_mode=BackgroundMode.THRESHOLD,
    background_index=0,
)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class Plain(DomainPlugin):
    name = "plain"

    def datasets(self):  # pragma: no cover - not used
        return {}


def tiny_model() -> CamClassifier:
    torch.manual_seed(0)
    return CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random").eval()


def ready(method: Method, model: CamClassifier) -> CamExtractor:
    """``method`` set up on the plain domain with single-scale, unflipped CAMs of ``model``."""
    method.setup(Plain(), MEAN, STD)
    return method.extractor(model, method.build_modules(model), scales=(1.0,), flip=False)


def cached_context(dataset: object, extractor: CamExtractor, cache_dir: Path, **more: object) -> FitContext:
    """A :class:`FitContext` on the plain domain and ``TWO`` that caches fits in ``cache_dir``."""
    return FitContext(
        dataset=dataset,  # type: ignore[arg-type]
        extractor=extractor,
        domain=Plain(),
        label_space=TWO,
        mean=MEAN,
        std=STD,
        cache_dir=cache_dir,
        settings=extractor_settings(extractor),
        **more,  # type: ignore[arg-type]
    )
