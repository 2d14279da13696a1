"""FMA's SAM side (Yang et al., WACV 2024): level-aware everything-mode masks and the SAM-based seeding module.

Why: a CAM knows which classes an image holds but draws poor shapes; SAM draws shapes but knows no
class. FMA's seeding module gives each SAM mask one class by the mean (normalised) CAM score inside
it, with a background score ``(1 − max score)^p``, and paints the masks in order of SAM level and
confidence, so whole objects win over their parts where they overlap.

Follows HAL-42/FMA-WSSS:

* ``src/libs/sam/custom_sam/sam_auto.py: SamAuto``: segment_anything's automatic mask generator
  that records each mask's *level* (0, 1, 2: the index of SAM's three multimask outputs for the
  grid point), shifts the predicted IoU per level before the IoU threshold (``score_thresh_offset``)
  and before the within-crop box NMS (``score_nms_offset``), and (``rock_sand_water``) keeps a mask
  of a lower level only if at most ``thresh`` of it lies in a single mask of the levels above;
  the VOC setting ``configs/sam_auto_seg/patterns/mask_gen_ini.py: l2_nmsf_s1_rsw3``
  (:data:`FMA_GENERATOR`);
* ``src/libs/seeding/seed_anns/score_cw.py: gather_norm_bg_argmax`` with the VOC seeding
  configuration (``norm_first=True``, ``gather_method='mean'``, ``bg_method={'method': 'pow',
  'pow': .6}``, ``priority=('level_bigger', 'conf_bigger')``): CAM clipped at 0, averaged over each
  mask, min-max normalised per class over the masks, background ``(1 − max_c)^0.6``, arg-max per
  mask with its score as confidence; masks sorted by (level, confidence) ascending and painted in
  that order (later wins); pixels under no mask are background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    calculate_stability_score,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    rle_to_mask,
    uncrop_masks,
)
from torch import Tensor

LEVELS = 3  # SAM's multimask outputs per point


@dataclass(frozen=True)
class FmaGeneratorSettings:
    """``SamAuto``'s arguments (FMA's names); defaults: the VOC pattern ``l2_nmsf_s1_rsw3``."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 1
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 2
    min_mask_region_area: int = 100
    score_thresh_offset: tuple[float, float, float] = (0.0, 0.0, 0.1)
    score_nms_offset: tuple[float, float, float] = (0.0, 0.0, 1.0)
    stability_score_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rock_sand_water_thresh: float | None = 0.3


FMA_GENERATOR = FmaGeneratorSettings()


@dataclass(frozen=True)
class LeveledMasks:
    """Everything-mode masks with their SAM level and predicted IoU, in the generator's order."""

    masks: Tensor  # S x H x W bool
    levels: Tensor  # S, int64 in 0..2
    scores: Tensor  # S, SAM's predicted IoU (before any offset)


class LeveledMaskGenerator(SamAutomaticMaskGenerator):
    """``SamAuto``: segment_anything's generator with per-level offsets and the rock-sand-water filter.

    ``predictor`` replaces the generator's own (a caching predictor reuses embeddings).
    """

    def __init__(self, predictor: Any, settings: FmaGeneratorSettings = FMA_GENERATOR) -> None:
        super().__init__(
            predictor.model,
            points_per_side=settings.points_per_side,
            points_per_batch=settings.points_per_batch,
            pred_iou_thresh=settings.pred_iou_thresh,
            stability_score_thresh=settings.stability_score_thresh,
            stability_score_offset=settings.stability_score_offset,
            box_nms_thresh=settings.box_nms_thresh,
            crop_n_layers=settings.crop_n_layers,
            crop_nms_thresh=settings.crop_nms_thresh,
            crop_overlap_ratio=settings.crop_overlap_ratio,
            crop_n_points_downscale_factor=settings.crop_n_points_downscale_factor,
            min_mask_region_area=settings.min_mask_region_area,
            output_mode="binary_mask",
        )
        self.predictor = predictor
        self.settings = settings

    def _process_batch(
        self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int], orig_size: tuple[int, ...]
    ) -> MaskData:
        """One batch of grid points: SAM's three masks per point, each tagged with its level.

        The IoU threshold and stability filter see the level-shifted scores; ``iou_preds`` then holds
        the NMS-shifted score, which the parent's within-crop NMS ranks by (``raw_iou`` keeps SAM's).
        """
        settings = self.settings
        transformed = self.predictor.transform.apply_coords(points, im_size)
        in_points = torch.as_tensor(transformed, device=self.predictor.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
        masks, iou_preds, _ = self.predictor.predict_torch(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, return_logits=True
        )
        offsets = {
            name: torch.as_tensor(getattr(settings, name), dtype=iou_preds.dtype, device=iou_preds.device)
            for name in ("score_thresh_offset", "score_nms_offset", "stability_score_bias")
        }
        levels = torch.arange(LEVELS, device=iou_preds.device).expand_as(iou_preds)
        data = MaskData(
            masks=masks.flatten(0, 1),
            raw_iou=iou_preds.flatten(0, 1),
            iou_thresh=(iou_preds + offsets["score_thresh_offset"]).flatten(0, 1),
            iou_preds=(iou_preds + offsets["score_nms_offset"]).flatten(0, 1),
            stability_bias=offsets["stability_score_bias"].expand_as(iou_preds).flatten(0, 1),
            level=levels.flatten(0, 1),
            points=torch.as_tensor(points.repeat(masks.shape[1], axis=0)),
        )
        del masks
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_thresh"] > self.pred_iou_thresh)
        data["stability_score"] = calculate_stability_score(
            data["masks"], self.predictor.model.mask_threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] + data["stability_bias"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > self.predictor.model.mask_threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        orig_h, orig_w = orig_size
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["rles"] = mask_to_rle_pytorch(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
        del data["masks"]
        return data

    @torch.no_grad()
    def generate_leveled(self, image: np.ndarray) -> LeveledMasks:
        """The masks of an ``H x W x 3`` uint8 image, after small-region cleaning and rock-sand-water."""
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        h, w = image.shape[:2]
        if len(data["rles"]) == 0:
            return LeveledMasks(
                torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
            )
        masks = torch.from_numpy(np.stack([rle_to_mask(r) for r in data["rles"]])).bool()
        levels = torch.as_tensor(np.asarray(data["level"]), dtype=torch.int64)
        scores = torch.as_tensor(np.asarray(data["raw_iou"]), dtype=torch.float32)
        if self.settings.rock_sand_water_thresh is not None:
            masks, levels, scores = rock_sand_water(
                masks, levels, scores, self.settings.rock_sand_water_thresh
            )
        return LeveledMasks(masks, levels, scores)


def rock_sand_water(
    masks: Tensor, levels: Tensor, scores: Tensor, thresh: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``SamAuto.rock_sand_water``: from the highest level down, a mask joins the kept set only if its
    largest recall (its share inside one kept mask) is below ``thresh``; output grouped by level,
    highest first, each group in its original order."""
    kept: list[int] = []
    for level in range(LEVELS - 1, -1, -1):
        candidates = torch.nonzero(levels == level).flatten()
        if candidates.numel() == 0:
            continue
        if kept:
            inside = masks[candidates].flatten(1).float() @ masks[kept].flatten(1).float().T
            areas = masks[candidates].flatten(1).sum(dim=1, keepdim=True).float()
            candidates = candidates[(inside / areas).amax(dim=1) < thresh]
        kept.extend(int(i) for i in candidates)
    order = torch.as_tensor(kept, dtype=torch.int64)
    return masks[order], levels[order], scores[order]


def seed_from_masks(cams: Tensor, masks: Tensor, levels: Tensor, bg_power: float | None = 0.6) -> Tensor:
    """``gather_norm_bg_argmax``: an ``H x W`` map of 0 (background or no mask) or ``1 + k`` (CAM ``k``).

    ``cams`` are the present classes' maps ``P x H x W``, ``masks`` ``S x H x W`` bool, ``levels``
    ``S``. ``bg_power=None`` is FMA's ``no_bg`` (no background score; for label spaces without a
    background class every mask takes a class). Ties in (level, confidence) keep the masks' order.
    """
    if cams.ndim != 3 or masks.ndim != 3 or cams.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"expected P x H x W CAMs and S x H x W masks, got {tuple(cams.shape)}, {tuple(masks.shape)}"
        )
    seed = torch.zeros(cams.shape[-2:], dtype=torch.int64, device=cams.device)
    if masks.shape[0] == 0 or cams.shape[0] == 0:
        return seed
    weights = masks.flatten(1).to(cams.dtype)  # S x HW
    areas = weights.sum(dim=1)
    gathered = cams.clamp(min=0).flatten(1) @ weights.T / areas  # P x S: mean score in each mask
    low = gathered.amin(dim=1, keepdim=True)
    high = gathered.amax(dim=1, keepdim=True)
    scores = (gathered - low) / (high - low + 1e-7)  # min_max_norm over the masks, per class
    if bg_power is not None:
        background = (1 - scores.amax(dim=0, keepdim=True)).pow(bg_power)
        scores = torch.cat([background, scores])
        index = scores.argmax(dim=0)
    else:
        index = scores.argmax(dim=0) + 1
    confidence = scores.amax(dim=0)
    by_confidence = torch.sort(confidence, stable=True).indices
    order = by_confidence[torch.sort(levels.to(cams.device)[by_confidence], stable=True).indices]
    for s in order.tolist():  # ascending priority: later masks paint over earlier ones
        seed[masks[s]] = index[s]
    return seed
