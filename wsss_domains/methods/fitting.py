"""What a post-hoc method that learns from the training split is given (see :meth:`Method.fit`).

Why: some refinements are fitted once on the images the classifier was trained on (with their
image-level labels) and then applied to every image pseudo-labelled (``seed-probe``). The engine
reopens the run's training split and hands it over in a :class:`FitContext`; the fitted state is
cached inside the run folder, keyed by everything it depends on, so a second pseudo-labelling job
with the same run and options does not fit again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin, LabelSpace

FIT_FOLDER = "fitted"


@dataclass
class FitContext:
    """The run's training split and what pseudo-labelling will use, for :meth:`Method.fit`."""

    dataset: Dataset  # samples as training saw them (patches/tiles with image-level ``label``)
    extractor: CamExtractor
    domain: DomainPlugin
    label_space: LabelSpace
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cache_dir: Path | None = None  # None: fit every time
    progress: bool = True
    # What else the fitted state depends on (the extractor's scales, flip, normalisation).
    settings: Mapping[str, Any] = field(default_factory=dict)
    # For runs trained with --labels-from-masks: builds the same annotated images cut into windows
    # of the training patch size at a quarter-patch stride, each labelled from its mask (see
    # :attr:`windows`). None for runs trained on image-level labels.
    window_factory: Callable[[], Dataset] | None = None
    _windows: Dataset | None = field(default=None, init=False, repr=False)

    @property
    def windows(self) -> Dataset | None:
        """More labelled windows than training's grid, for methods that learn from labels alone
        (``label-probe``); built on first use, None where the run had no masks to label them by."""
        if self.window_factory is None:
            return None
        if self._windows is None:
            self._windows = self.window_factory()
        return self._windows

    def cache_path(self, method_name: str, options: Mapping[str, Any]) -> Path | None:
        """Where ``method_name`` with ``options`` keeps its fitted state, or None without a cache."""
        if self.cache_dir is None:
            return None
        key = json.dumps({"options": dict(options), **self.settings}, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{method_name}-{digest}.pt"


def extractor_settings(extractor: CamExtractor) -> dict[str, Any]:
    """The extractor settings a fitted state depends on (part of its cache key)."""
    return {
        "scales": list(extractor.scales),
        "flip": extractor.flip,
        "base_scale": extractor.base_scale,
        "normalization": extractor.normalization,
    }
