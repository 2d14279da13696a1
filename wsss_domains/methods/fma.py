"""``fma-seed``: FMA's SAM-based seeding module (Yang et al., WACV 2024) on any method's CAMs.

Why: FMA's pseudo-labels come from giving whole SAM masks a class by the CAM's mean score inside
them (with a background score that grows where no class responds), painting whole objects over
their parts. The module is independent of where the CAMs come from, so it chains after any method:
``clip-es-learned+fma-seed`` is FMA's coarse seed (learned CLIP prompts, class-aware attention
refinement, SAM seeding), ``cam+fma-seed`` the same on a classifier's CAMs.

Pseudo-label time only. See :mod:`wsss_domains.sam.fma` for the transcribed generator and seeding
rule. With a SAM that takes point prompts the masks are FMA's level-aware everything-mode masks
(points per side 32, one crop layer, the VOC pattern's offsets and rock-sand-water filter); a
box-only SAM (LiteMedSAM) cannot segment a point grid, so its masks are the method's CAM-box masks,
all at one level (then the order of painting is by confidence alone).

Deviations (also :attr:`FmaSeed.deviations`): pixels the engine excludes stay ignored; in a label
space without a background class FMA's ``no_bg`` rule applies (every mask takes a present class)
and pixels under no mask keep the CAM label (FMA: background); the CAMs are the engine's normalised
maps of the present classes at the image's size (FMA: CAA-refined CLIP CAMs resized to the image,
which the per-class min-max over masks makes equivalent up to scale).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_base import SamMethod
from wsss_domains.sam.fma import FMA_GENERATOR, FmaGeneratorSettings, LeveledMasks


@register_method
class FmaSeed(SamMethod):
    name = "fma-seed"
    description = (
        "FMA's SAM-based seeding (Yang et al., WACV 2024): each SAM mask takes the present class with the "
        "highest mean CAM score in it (min-max over the masks) or background, (1 - max)^0.6; masks painted by "
        "SAM level then confidence. Level-aware everything mode for point SAMs, CAM boxes for LiteMedSAM. "
        "Chain after any CAM method, e.g. clip-es-learned+fma-seed. Needs a SAM checkpoint."
    )
    deviations = (
        "excluded pixels stay ignored; without a background class every mask takes a present class and "
        "pixels under no mask keep the CAM label (FMA: background); the engine's normalised CAMs of the present "
        "classes (FMA: CAA-refined CLIP CAMs; the per-class min-max over masks makes the scale irrelevant); "
        "a box-only SAM gets CAM-box masks at one level instead of the level-aware point grid"
    )

    def __init__(
        self,
        bg_power: float = 0.6,
        crop_layers: int = FMA_GENERATOR.crop_n_layers,
        rock_sand_water: float | None = FMA_GENERATOR.rock_sand_water_thresh,
        min_region_area: int = FMA_GENERATOR.min_mask_region_area,
        everything_points_per_side: int = FMA_GENERATOR.points_per_side,
        everything_pred_iou_thresh: float = FMA_GENERATOR.pred_iou_thresh,
        everything_stability_thresh: float = FMA_GENERATOR.stability_score_thresh,
        **options: Any,
    ) -> None:
        """FMA's VOC settings by default; SAM's choice, cache and prompt options as for every SAM method."""
        if bg_power <= 0:
            raise ValueError(f"fma-seed: bg_power must be positive, got {bg_power}")
        if crop_layers < 0:
            raise ValueError(f"fma-seed: crop_layers must be 0 or more, got {crop_layers}")
        super().__init__(
            bg_power=bg_power,
            crop_layers=crop_layers,
            rock_sand_water=rock_sand_water,
            min_region_area=min_region_area,
            everything_points_per_side=everything_points_per_side,
            everything_pred_iou_thresh=everything_pred_iou_thresh,
            everything_stability_thresh=everything_stability_thresh,
            **options,
        )
        self.bg_power = float(bg_power)
        self.generator_settings = FmaGeneratorSettings(
            points_per_side=int(everything_points_per_side),
            pred_iou_thresh=float(everything_pred_iou_thresh),
            stability_score_thresh=float(everything_stability_thresh),
            crop_n_layers=int(crop_layers),
            min_mask_region_area=int(min_region_area),
            rock_sand_water_thresh=None if rock_sand_water is None else float(rock_sand_water),
        )

    def leveled_masks(
        self, image: Tensor, cams: Tensor, present: Tensor, context: RefineContext
    ) -> LeveledMasks:
        """FMA's level-aware everything-mode masks, or (box-only SAM, or a prompt option) the CAM-prompted ones."""
        from wsss_domains.domains.contract import PromptKind
        from wsss_domains.sam.fma import LeveledMaskGenerator

        segmenter = self.segmenter(image.device, context.domain)
        kind = self.prompt_kind(self.strategy(context.domain), segmenter.sam)
        if kind is not PromptKind.EVERYTHING:
            masks = self.segments(image, cams, present, context.domain)
            levels = torch.zeros(masks.shape[0], dtype=torch.int64)
            return LeveledMasks(masks, levels, torch.ones(masks.shape[0]))
        rgb = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        generator = LeveledMaskGenerator(segmenter.predictor, self.generator_settings)
        return generator.generate_leveled(rgb)

    def refine_labels(self, labels: Tensor, cams: Tensor, context: RefineContext) -> Tensor:
        from wsss_domains.sam.fma import seed_from_masks

        space = context.label_space
        present = torch.nonzero(context.present > 0.5).flatten().tolist()
        if not present:
            return labels
        found = self.leveled_masks(context.image, cams, context.present, context)
        if found.masks.shape[0] == 0:
            return labels
        masks = found.masks.to(labels.device)
        background = space.background_index
        seed = seed_from_masks(
            cams[present].to(labels.device).float(),
            masks,
            found.levels,
            bg_power=self.bg_power if background is not None else None,
        )
        ids = torch.tensor(
            [background if background is not None else -1, *(space.foreground[k] for k in present)]
        )
        out = ids.to(labels.device)[seed].to(labels.dtype)
        if background is None:  # no_bg: pixels under no mask keep the CAM label
            out = torch.where(masks.any(dim=0), out, labels)
        return torch.where(labels == space.ignore_index, labels, out)
