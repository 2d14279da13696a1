"""The remote-sensing domain plugin: land cover and overhead objects from image-level labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from wsss_adapters.remote_sensing import deepglobe, dubai, isaid, isprs, loveda, torchgeo_layouts
from wsss_adapters.remote_sensing.prompts import clip_prompts_for

from wsss_domains.domains.contract import (
    ClipPrompts,
    DatasetSpec,
    DomainPlugin,
    LabelSpace,
    MetricResult,
    PromptKind,
    Recipe,
    Sample,
    SamStrategy,
)

if TYPE_CHECKING:
    from torch import Tensor

# The torchgeo layouts come last: a label space names its dataset (prompts) by its first loader.
_SPECS = (
    deepglobe.SPEC,
    loveda.SPEC,
    isprs.POTSDAM,
    isprs.VAIHINGEN,
    isaid.SPEC,
    dubai.SPEC,
    *torchgeo_layouts.SPECS,
)


class RemoteSensingDomain(DomainPlugin):
    """DeepGlobe, LoveDA, ISPRS Potsdam/Vaihingen, iSAID and Dubai aerial; rasters read by window.

    DeepGlobe, LoveDA, Potsdam and Vaihingen are also read in torchgeo's own layouts
    (``torchgeo-deepglobe``, ``torchgeo-loveda``, ... : see :mod:`torchgeo_layouts`).

    Every loader takes, besides ``labels_from_masks`` and ``patch_size`` (tile side, or height and
    width, of the mask-labelled tiles): ``bands`` (1-based bands to use as R, G, B), ``scaling``
    (``auto``, ``percentile`` or ``dtype``), ``overlap`` (pixels shared by neighbouring tiles) and
    ``min_fraction`` (share of a tile's scored pixels a class needs to enter its label). Splits
    accept a hold-out slice of their images sorted by id: ``train[0:6]``, ``train[80%:]``.
    """

    name = "remote-sensing"
    description = "Remote sensing: DeepGlobe, LoveDA, ISPRS Potsdam/Vaihingen, iSAID, Dubai aerial"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {spec.name: spec for spec in _SPECS}

    # The hooks import their torch code where they run: listing domains must not load torch.
    def train_augment(self, sample: Sample) -> Sample:
        from wsss_adapters.remote_sensing.augment import flip_rotate

        return flip_rotate(sample)

    def recipe(self, dataset: str) -> Recipe:
        """label-probe (seed-probe on Dubai): the best tile pseudo-labels at 15 minutes per dataset."""
        if dataset == dubai.NAME:
            return Recipe(
                method="seed-probe",
                why="seed-probe gave the best Dubai pseudo-labels (benchmarks/results/domains-15min.md)",
            )
        return Recipe(
            method="label-probe",
            why="label-probe gave the best DeepGlobe pseudo-labels (benchmarks/results/domains-15min.md)",
        )

    def metrics(self, confusion: Tensor, label_space: LabelSpace) -> list[MetricResult]:
        from wsss_adapters.remote_sensing.metrics import agreement_metrics

        return agreement_metrics(confusion, label_space)

    def clip_prompts(self, label_space: LabelSpace) -> ClipPrompts:
        return clip_prompts_for(self._dataset_name(label_space), label_space)

    def sam_strategy(self) -> SamStrategy:
        """Point prompts at CAM peaks: land-cover regions are large and ragged, poorly boxed.

        A class shows up as many disjoint patches in one tile, hence more prompts per class.
        """
        return SamStrategy(prompt=PromptKind.POINTS, model="vit_b", max_prompts_per_class=8)

    def _dataset_name(self, label_space: LabelSpace) -> str | None:
        for spec in _SPECS:
            if spec.label_space == label_space:
                return spec.name
        return None
