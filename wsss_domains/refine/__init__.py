"""Post-hoc CAM refinement (PAR, dense CRF, random walk) behind a name-based registry.

Every refiner is built by name with its own keyword parameters and called the same way,
``refiner(image, cams, bg_threshold=None)``, so pipelines and configs can switch between them.
``crf`` is listed only when ``pydensecrf2`` is importable (it is built from source, so optional).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec

from wsss_domains.refine.background import add_background, dual_threshold_labels
from wsss_domains.refine.base import Refiner
from wsss_domains.refine.par import PixelAdaptiveRefiner
from wsss_domains.refine.random_walk import RandomWalkRefiner

__all__ = [
    "PixelAdaptiveRefiner",
    "RandomWalkRefiner",
    "Refiner",
    "add_background",
    "dual_threshold_labels",
    "get_refiner",
    "list_refiners",
    "refiner_class",
]


def _crf_factory(**params: object) -> Refiner:
    from wsss_domains.refine.crf import DenseCRFRefiner  # needs pydensecrf, imported on demand

    return DenseCRFRefiner(**params)  # type: ignore[arg-type]


def _factories() -> dict[str, Callable[..., Refiner]]:
    factories: dict[str, Callable[..., Refiner]] = {
        PixelAdaptiveRefiner.name: PixelAdaptiveRefiner,
        RandomWalkRefiner.name: RandomWalkRefiner,
    }
    if find_spec("pydensecrf") is not None:
        factories["crf"] = _crf_factory
    return factories


def list_refiners() -> list[str]:
    """Names accepted by ``get_refiner`` in this environment, sorted."""
    return sorted(_factories())


def refiner_class(name: str) -> type:
    """The class ``get_refiner(name)`` builds, for reading its constructor's parameters without building it."""
    if name == "crf" and find_spec("pydensecrf") is not None:
        from wsss_domains.refine.crf import DenseCRFRefiner

        return DenseCRFRefiner
    factory = _factories().get(name)
    if not isinstance(factory, type):
        raise KeyError(f"unknown refiner '{name}'; available: {', '.join(list_refiners())}")
    return factory


def get_refiner(name: str, **params: object) -> Refiner:
    """A refiner built with ``params`` (its constructor's keyword arguments)."""
    factories = _factories()
    if name not in factories:
        hint = " (install pydensecrf2 for it)" if name == "crf" else ""
        raise KeyError(f"unknown refiner '{name}'{hint}; available: {', '.join(sorted(factories))}")
    return factories[name](**params)
