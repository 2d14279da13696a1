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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.progress import progress_bar

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


@dataclass
class FitSample:
    """One training sample as a fit reads it."""

    sample: dict[str, Any]
    present: Tensor  # multi-hot image-level labels over the foreground classes
    prepared: Tensor  # the image in [0, 1] after the domain's preprocessing (stain normalisation)
    x: Tensor  # ``prepared`` normalised for the classifier
    exclude: Tensor | None  # pixels not to learn from (white glass, no-data)


def draw_fit_samples(
    context: FitContext,
    dataset: Any,
    fit_images: int,
    generator: torch.Generator,
    wanted: Callable[[Tensor], bool],
    desc: str,
) -> Iterator[FitSample]:
    """Up to ``fit_images`` samples of ``dataset`` (drawn with ``generator``, read in index order)
    whose image-level labels are ``wanted``, each preprocessed once for both CAMs and features."""
    from wsss_domains.pseudo_labels.writer import image_labels
    from wsss_domains.training.data import normalize

    order = torch.randperm(len(dataset), generator=generator)[:fit_images].sort().values.tolist()
    domain, label_space = context.domain, context.label_space
    for index in progress_bar(order, desc=desc, unit="img"):
        sample = dataset[index]
        present = image_labels(sample, label_space, "auto")
        if present is None or not wanted(present):
            continue
        raw = sample["image"]
        prepared = domain.preprocess(raw)
        exclude = sample.get("exclude")
        if exclude is None:
            exclude = domain.exclude_mask(raw, label_space)
        yield FitSample(sample, present, prepared, normalize(prepared, context.mean, context.std), exclude)
