"""The histopathology domain plugin: H&E tissue segmentation from image-level labels."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from wsss_adapters.histo import bcss_wsss, glas, luad_histoseg, wsss4luad
from wsss_adapters.histo.demo import write_demo
from wsss_adapters.histo.prompts import clip_prompts_for

from wsss_domains.domains.contract import (
    BackgroundMode,
    ClipPrompts,
    DatasetSpec,
    DemoData,
    DomainPlugin,
    LabelSpace,
    PromptKind,
    Recipe,
    Sample,
    SamStrategy,
)

if TYPE_CHECKING:
    from torch import Tensor

# Label spaces whose unannotated images should not lose their white regions: white in breast
# tissue is mostly fat, which BCSS-WSSS does not treat as background.
_KEEP_WHITE = (bcss_wsss.LABEL_SPACE,)


class HistoDomain(DomainPlugin):
    """WSSS4LUAD, LUAD-HistoSeg, BCSS-WSSS and GlaS; glass excluded by colour, SAM via LiteMedSAM.

    Option ``stain="macenko"`` (``--domain-option stain=macenko``) makes :meth:`preprocess`
    Macenko-normalise every image (MONAI) before the networks see it, in training and in every later
    stage, since runs record it. Loaders take a similar option (``build(..., stain_normalize=True)``);
    enable it in one place, not both.
    """

    name = "histo"
    description = "Histopathology (H&E): WSSS4LUAD, LUAD-HistoSeg, BCSS-WSSS, GlaS"

    def __init__(self, stain: Literal["none", "macenko"] = "none") -> None:
        self.stain = stain
        # read by code written before the option had a name
        self.stain_normalize = stain == "macenko"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        specs = (wsss4luad.SPEC, luad_histoseg.SPEC, bcss_wsss.SPEC, glas.SPEC)
        return {spec.name: spec for spec in specs}

    def demo(self, root: Path) -> DemoData:
        """Synthetic WSSS4LUAD-layout set: train on labelled patches, score the annotated split."""
        return DemoData(
            wsss4luad.NAME,
            write_demo(Path(root)),
            train_split="training",
            eval_split="validation",
            image_size=128,  # the synthetic patches' own size: no upscaling, a few times faster
        )

    def recipe(self, dataset: str) -> Recipe:
        """label-probe: the best histology pseudo-labels measured (benchmarks/results/histo.md)."""
        if dataset == glas.NAME:  # binary gland / background by threshold: not measured, plain CAM
            return Recipe()
        return Recipe(
            method="label-probe",
            why="label-probe gave the best WSSS4LUAD pseudo-labels on held-out ROIs (benchmarks/results/histo.md)",
        )

    # The hooks import their torch code where they run: listing domains must not load torch.
    def preprocess(self, image: Tensor) -> Tensor:
        from wsss_adapters.histo.stain import normalize_stains

        return normalize_stains(image) if self.stain_normalize else image

    def train_augment(self, sample: Sample) -> Sample:
        from wsss_adapters.histo.augment import histo_augment

        return histo_augment(sample)

    def exclude_mask(self, image: Tensor, label_space: LabelSpace) -> Tensor | None:
        """White / glass pixels where background is excluded by colour (not for BCSS or GlaS)."""
        if label_space.background_mode is not BackgroundMode.EXCLUDE or label_space in _KEEP_WHITE:
            return None
        from wsss_adapters.histo.background import white_mask

        return white_mask(image)

    def scored_classes(self, label_space: LabelSpace) -> tuple[int, ...]:
        """Tissue classes; with a threshold-decided background (GlaS) that class is tissue too."""
        if label_space.background_mode is BackgroundMode.THRESHOLD:
            return tuple(range(label_space.num_classes))
        return label_space.foreground

    def clip_prompts(self, label_space: LabelSpace) -> ClipPrompts:
        return clip_prompts_for(self._dataset_name(label_space), label_space)

    def sam_strategy(self) -> SamStrategy:
        return SamStrategy(prompt=PromptKind.BOXES, model="lite_medsam")

    def _dataset_name(self, label_space: LabelSpace) -> str | None:
        for name, spec in self.datasets().items():
            if spec.label_space == label_space:
                return name
        return None
