"""The tiny random CLIP tower that the CLIP method tests set their methods up on (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

from wsss_domains.clip.tiny import save_tiny_clip
from wsss_domains.domains import DomainPlugin
from wsss_domains.methods import create_method
from wsss_domains.methods.base import Method

# Input statistics of the tests' images, deliberately not CLIP's, so the methods must convert.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_clip(folder: Path, name: str, seed: int, **kwargs) -> tuple[str, Path]:
    """A tiny random architecture registered with open_clip as ``name`` and a saved checkpoint of it."""
    path, _ = save_tiny_clip(folder, name, seed=seed, **kwargs)
    return name, path


def clip_method(method: str, tiny_weights: tuple[str, Path], domain: DomainPlugin, **options) -> Method:
    """The registry's ``method`` on the tiny tower, set up for ``domain`` with the tests' input statistics."""
    name, path = tiny_weights
    created = create_method(method, clip_model=name, clip_weights=str(path), **options)
    created.setup(domain, MEAN, STD)
    return created
