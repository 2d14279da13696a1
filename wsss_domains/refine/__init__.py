"""Post-hoc CAM refinement (PAR, dense CRF, random walk) behind a name-based registry.

Every refiner is built by name with its own keyword parameters and called the same way,
``refiner(image, cams, bg_threshold=None)``, so pipelines and configs can switch between them.
``crf`` is listed only when ``pydensecrf2`` is importable (it is built from source, so optional).
A package adds its own refiner class (with a ``name`` attribute and that call) through the
``wsss_domains.refiners`` entry-point group.
"""

from __future__ import annotations

from importlib.util import find_spec

from wsss_domains.refine.background import add_background, dual_threshold_labels
from wsss_domains.refine.base import Refiner
from wsss_domains.refine.par import PixelAdaptiveRefiner
from wsss_domains.refine.random_walk import RandomWalkRefiner
from wsss_domains.registry import Registry

__all__ = [
    "REFINERS",
    "PixelAdaptiveRefiner",
    "RandomWalkRefiner",
    "Refiner",
    "add_background",
    "create_refiner",
    "dual_threshold_labels",
    "list_refiners",
    "refiner_class",
]

ENTRY_POINT_GROUP = "wsss_domains.refiners"


def _checked_refiner(name: str, loaded: object) -> type:
    if not (isinstance(loaded, type) and callable(loaded)):
        raise TypeError(f"refiner entry point '{name}' ({loaded!r}) is not a class")
    if getattr(loaded, "name", None) != name:
        raise ValueError(
            f"refiner entry point '{name}' loads a class named {getattr(loaded, 'name', None)!r}"
        )
    return loaded


REFINERS: Registry[type] = Registry("refiner", ENTRY_POINT_GROUP, _checked_refiner)
REFINERS.register(PixelAdaptiveRefiner.name, PixelAdaptiveRefiner)
REFINERS.register(RandomWalkRefiner.name, RandomWalkRefiner)
if find_spec("pydensecrf") is not None:
    REFINERS.register_lazy("crf", "wsss_domains.refine.crf:DenseCRFRefiner")


def list_refiners() -> list[str]:
    """Names accepted by :func:`create_refiner` in this environment, sorted."""
    return REFINERS.names()


def refiner_class(name: str) -> type:
    """The class ``create_refiner(name)`` builds, for reading its constructor's parameters first."""
    if name == "crf" and name not in REFINERS:
        raise REFINERS.unknown(name, " (install pydensecrf2 for it)")
    return REFINERS.get(name)


def create_refiner(name: str, **params: object) -> Refiner:
    """A refiner built with ``params`` (its constructor's keyword arguments)."""
    return refiner_class(name)(**params)
