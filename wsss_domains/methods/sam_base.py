"""What the SAM-based methods (sepl, sam-proto, s2c) share: one SAM per method, its cache, its masks.

Which SAM: option ``sam_model``, else the domain's ``SamStrategy.model`` (histology: LiteMedSAM);
its weights: option ``sam_checkpoint`` (``--sam-checkpoint``), else the registry's default place.
The SAM is loaded once per method instance, on first use, so listing or creating methods stays
cheap; tests inject a ready :class:`~wsss_domains.sam.registry.LoadedSam` as option ``sam``.
Everything SAM-related is imported lazily for the same reason (segment_anything, TinyViT).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from wsss_domains.domains.contract import DomainPlugin, PromptKind, SamStrategy
from wsss_domains.methods.base import Method
from wsss_domains.sam.cache import CACHE_ENV, default_cache_dir

if TYPE_CHECKING:
    from wsss_domains.sam.cache import EmbeddingCache
    from wsss_domains.sam.registry import LoadedSam
    from wsss_domains.sam.segmenter import SamSegmenter

log = logging.getLogger(__name__)

SAM_CACHE_ENV = CACHE_ENV
NO_CACHE = ("", "none", "off", "false", "0")
AUTO = "auto"


def sam_cache_dir(option: object = None) -> Path | None:
    """Embedding cache folder: the ``sam_cache`` option, else ``$WSSS_SAM_CACHE``, else the default.

    ``none`` / ``off`` (or an empty value) turns the cache off.
    """
    value = option if option is not None else os.environ.get(SAM_CACHE_ENV, str(default_cache_dir()))
    if value is False or str(value).strip().lower() in NO_CACHE:
        return None
    return Path(str(value)).expanduser()


class LastEmbedding:
    """Keeps the most recent SAM embedding, in front of an optional disk cache.

    Two SAM passes over one image (S2C's everything-mode segments and its CAM-prompted masks) then
    run the image encoder -- by far SAM's dearest part -- once, with or without a disk cache. It
    offers the one method :class:`~wsss_domains.sam.predictor.CachedSamPredictor` calls.
    """

    def __init__(self, disk: EmbeddingCache | None = None) -> None:
        self.disk = disk
        self.key: str | None = None
        self.value: Tensor | None = None

    def get_or_compute(
        self, model_name: str, checkpoint_id: str, model_input: Tensor, encode: Callable[[Tensor], Tensor]
    ) -> Tensor:
        from wsss_domains.sam.cache import embedding_key

        key = embedding_key(model_name, checkpoint_id, model_input)
        if key == self.key and self.value is not None:
            return self.value.to(model_input.device)
        disk = self.disk
        if disk is not None and (stored := disk.load(model_name, key)) is not None:
            disk.hits += 1
            value = stored.to(model_input.device, torch.float32)
        else:
            value = encode(model_input)
            if self.disk is not None:
                self.disk.misses += 1
                try:
                    self.disk.store(model_name, key, value)
                except OSError as exc:  # a full or read-only disk costs speed, not the run
                    log.warning(
                        "SAM embedding cache %s unusable (%s); going on without it", self.disk.root, exc
                    )
                    self.disk = None
        self.key, self.value = key, value
        return value


def embedding_cache(option: object = None) -> LastEmbedding:
    """The last embedding in memory, in front of the on-disk cache of :func:`sam_cache_dir` (``none``: memory only)."""
    from wsss_domains.sam.cache import EmbeddingCache

    root = sam_cache_dir(option)
    return LastEmbedding(EmbeddingCache(root) if root is not None else None)


class SamMethod(Method):
    """Base of the SAM methods: resolves, loads and caches one SAM, and segments images with it.

    Options (``--method-option KEY=VALUE``):

    * ``sam_model``: SAM registry name (default: the domain's ``SamStrategy.model``);
    * ``sam_checkpoint``: its weights (``--sam-checkpoint``; default: the registry's location);
    * ``sam_cache``: embedding cache folder, ``none`` for no cache (default ``$WSSS_SAM_CACHE`` or
      ``~/.cache/wsss-domains/sam-embeddings``);
    * ``prompt``: ``auto`` (everything mode where the SAM takes point grids, else the domain's
      prompt kind, which a box-only SAM such as LiteMedSAM turns into boxes), ``everything``,
      ``boxes`` or ``points``;
    * ``everything_points_per_side`` (32), ``everything_pred_iou_thresh`` (0.88),
      ``everything_stability_thresh`` (0.95): SAM's automatic mask generator;
    * ``sam``: a ready ``LoadedSam`` (tests; never from the command line).
    """

    def __init__(
        self,
        sam_model: str | None = None,
        sam_checkpoint: str | None = None,
        sam_cache: str | None = None,
        prompt: str = AUTO,
        min_peak_distance: int = 8,
        everything_points_per_side: int = 32,
        everything_pred_iou_thresh: float = 0.88,
        everything_stability_thresh: float = 0.95,
        sam: LoadedSam | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            sam_model=sam_model,
            sam_checkpoint=sam_checkpoint,
            sam_cache=sam_cache,
            prompt=prompt,
            min_peak_distance=min_peak_distance,
            everything_points_per_side=everything_points_per_side,
            everything_pred_iou_thresh=everything_pred_iou_thresh,
            everything_stability_thresh=everything_stability_thresh,
            **options,
        )
        # Not an option from text: a loaded model is kept out of ``options`` (cache keys, run.json).
        self._sam = sam
        self._segmenter: SamSegmenter | None = None
        self._cache: LastEmbedding | None = None

    # -- which SAM ---------------------------------------------------------------------------
    def strategy(self, domain: DomainPlugin | None = None) -> SamStrategy:
        """The domain's SamStrategy (the one given, else the one from :meth:`setup`)."""
        domain = domain or self.domain
        if domain is None:
            raise RuntimeError(f"method '{self.name}' needs a domain: call setup(domain, mean, std) first")
        return domain.sam_strategy()

    def sam_model_name(self, domain: DomainPlugin | None = None) -> str:
        if self._sam is not None:
            return self._sam.name
        return str(self.options.get("sam_model") or self.strategy(domain).model)

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        """Also checks that the SAM checkpoint exists, so a missing file fails before any work."""
        super().setup(domain, mean, std)
        if self._sam is None:
            from wsss_domains.sam.registry import resolve_checkpoint

            resolve_checkpoint(self.sam_model_name(domain), self.options.get("sam_checkpoint"))

    def sam(self, device: torch.device | str = "cpu", domain: DomainPlugin | None = None) -> LoadedSam:
        """The method's SAM, loaded on first call and moved to ``device``."""
        if self._sam is None:
            from wsss_domains.sam.registry import create_sam

            name = self.sam_model_name(domain)
            self._sam = create_sam(name, self.options.get("sam_checkpoint"), device=device)
            log.info("method %s: SAM '%s' from %s", self.name, name, self._sam.checkpoint)
        if self._sam.model.device != torch.device(device):
            self._sam.model.to(device)
        return self._sam

    def embedding_cache(self) -> LastEmbedding:
        """The last embedding in memory, in front of the on-disk cache unless ``sam_cache=none``."""
        if self._cache is None:
            self._cache = embedding_cache(self.options.get("sam_cache"))
        return self._cache

    def segmenter(
        self, device: torch.device | str = "cpu", domain: DomainPlugin | None = None
    ) -> SamSegmenter:
        """A :class:`~wsss_domains.sam.segmenter.SamSegmenter` over the method's SAM and cache."""
        sam = self.sam(device, domain)
        if self._segmenter is None:
            from wsss_domains.sam.segmenter import SamSegmenter

            self._segmenter = SamSegmenter(
                sam,
                cache=self.embedding_cache(),  # type: ignore[arg-type]  # same get_or_compute
                min_peak_distance=int(self.options.get("min_peak_distance", 8)),
                everything_points_per_side=int(self.options.get("everything_points_per_side", 32)),
                everything_pred_iou_thresh=float(self.options.get("everything_pred_iou_thresh", 0.88)),
                everything_stability_thresh=float(self.options.get("everything_stability_thresh", 0.95)),
            )
        return self._segmenter

    # -- masks -------------------------------------------------------------------------------
    def prompt_kind(self, strategy: SamStrategy, sam: LoadedSam) -> PromptKind:
        """Option ``prompt``; ``auto``: everything mode if the SAM takes point grids, else boxes."""
        choice = str(self.options.get("prompt", AUTO)).lower()
        if choice != AUTO:
            return PromptKind(choice)
        if sam.supports_points:
            return PromptKind.EVERYTHING
        # A box-only SAM (LiteMedSAM) can follow the domain's prompt kind only when it is boxes.
        return strategy.prompt if strategy.prompt is PromptKind.BOXES else PromptKind.BOXES

    def segments(self, image: Tensor, cams: Tensor, present: Tensor, domain: DomainPlugin) -> Tensor:
        """SAM masks ``N x H x W`` (bool) of a ``3 x H x W`` image in [0, 1], prompted as configured.

        Box and point prompts come from the CAMs of the present classes with the domain's
        thresholds; everything mode ignores the CAMs.
        """
        segmenter = self.segmenter(image.device, domain)
        strategy = self.strategy(domain)
        strategy = replace(strategy, prompt=self.prompt_kind(strategy, segmenter.sam))
        return segmenter.segment(image, cams, strategy, labels=present).masks
