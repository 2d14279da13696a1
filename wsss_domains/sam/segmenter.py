"""SAM masks for one image from its CAMs, prompted the way the domain's SamStrategy says.

This is the shared front half of the SAM methods (SEPL, S2C, SAM-derived prototypes): CAMs ->
prompts -> SAM masks at image resolution. Resizing to the model's input (longest side, padding,
the model's own normalisation) and mapping masks back is SamPredictor's, via
:class:`~wsss_domains.sam.predictor.CachedSamPredictor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_domains.domains.contract import PromptKind, SamStrategy
from wsss_domains.sam.cache import EmbeddingCache
from wsss_domains.sam.predictor import CachedSamPredictor
from wsss_domains.sam.prompts import cam_boxes, cam_peaks, everything_masks
from wsss_domains.sam.registry import LoadedSam


@dataclass
class SamMasks:
    """SAM's masks for one image, at the image's size.

    ``classes[n]`` is the CAM channel whose prompt produced mask ``n`` (box / point modes), or -1
    for everything-mode masks, which carry no class until SEPL labels them.
    """

    masks: Tensor  # N x H x W bool
    scores: Tensor  # N, SAM's predicted IoU of each mask
    classes: Tensor  # N int64
    prompt: PromptKind
    num_classes: int
    logits: Tensor | None = None  # N x H x W mask logits (box / point modes, when asked for)

    def class_masks(self) -> Tensor:
        """``KxHxW`` bool: per CAM channel, the union of the masks its prompts produced."""
        if self.prompt is PromptKind.EVERYTHING:
            raise ValueError("everything-mode masks have no class; label them with sepl_refine")
        h, w = self.masks.shape[-2:]
        out = torch.zeros(self.num_classes, h, w, dtype=torch.bool, device=self.masks.device)
        for k in range(self.num_classes):
            chosen = self.masks[self.classes == k]
            if chosen.numel():
                out[k] = chosen.any(dim=0)
        return out


class SamSegmenter:
    """Turns (image, CAMs, SamStrategy) into SAM masks with one SAM and an optional embedding cache.

    ``min_peak_distance`` (pixels) spaces S2C point prompts; ``min_region_area`` drops CAM regions
    too small to box; the ``everything_*`` options go to SamAutomaticMaskGenerator.
    """

    def __init__(
        self,
        sam: LoadedSam,
        cache: EmbeddingCache | None = None,
        min_peak_distance: int = 8,
        min_region_area: int = 1,
        everything_points_per_side: int = 32,
        everything_pred_iou_thresh: float = 0.88,
        everything_stability_thresh: float = 0.95,
    ) -> None:
        self.sam = sam
        self.predictor = CachedSamPredictor(sam, cache)
        self.min_peak_distance = min_peak_distance
        self.min_region_area = min_region_area
        self.everything_points_per_side = everything_points_per_side
        self.everything_pred_iou_thresh = everything_pred_iou_thresh
        self.everything_stability_thresh = everything_stability_thresh

    def embed(self, image: Tensor) -> Tensor:
        """The (cached) ``1xCxhxw`` SAM embedding of a ``3xHxW`` image in [0, 1]."""
        return self.predictor.set_image_tensor(image)

    @torch.no_grad()
    def segment(
        self,
        image: Tensor,
        cams: Tensor | None,
        strategy: SamStrategy,
        labels: Tensor | None = None,
        return_logits: bool = False,
    ) -> SamMasks:
        """SAM masks of ``image`` (``3xHxW`` in [0, 1]) prompted from ``cams`` (``KxH'xW'`` in [0, 1]).

        CAMs of another size are resized (bilinear) to the image. ``labels`` (``K`` multi-hot)
        skips the classes absent from the image; so does an all-zero CAM. Box mode gives one mask
        per box; point mode one mask per peak (the best of SAM's three by predicted IoU, as one
        click is ambiguous); everything mode ignores the CAMs (they may be None).
        """
        if strategy.prompt is not PromptKind.BOXES and not self.sam.supports_points:
            raise ValueError(
                f"SAM '{self.sam.name}' was trained with box prompts only; prompt kind"
                f" '{strategy.prompt.value}' needs point prompts. Use PromptKind.BOXES or another model."
            )
        h, w = image.shape[-2:]
        if strategy.prompt is PromptKind.EVERYTHING:
            return self._everything(image)
        if cams is None:
            raise ValueError(f"prompt kind '{strategy.prompt.value}' needs CAMs")
        cams = self._cams_at(cams, h, w)
        keep = torch.ones(cams.shape[0], dtype=torch.bool) if labels is None else labels.cpu() > 0
        if keep.numel() != cams.shape[0]:
            raise ValueError(f"labels has {keep.numel()} entries for {cams.shape[0]} CAMs")
        prompts, classes = [], []
        for k in torch.nonzero(keep).flatten().tolist():
            if strategy.prompt is PromptKind.BOXES:
                found = cam_boxes(
                    cams[k], strategy.cam_threshold, strategy.max_prompts_per_class, self.min_region_area
                )
            else:
                found = cam_peaks(
                    cams[k], strategy.peak_threshold, self.min_peak_distance, strategy.max_prompts_per_class
                )
            prompts.append(found)
            classes += [k] * len(found)
        if not classes:
            return self._empty(h, w, strategy.prompt, cams.shape[0], return_logits)
        return self._prompted(
            image, torch.cat(prompts), torch.tensor(classes), strategy.prompt, cams.shape[0], return_logits
        )

    def _cams_at(self, cams: Tensor, h: int, w: int) -> Tensor:
        if cams.ndim != 3:
            raise ValueError(f"expected KxHxW CAMs, got {tuple(cams.shape)}")
        cams = cams.detach().float().cpu()
        if tuple(cams.shape[-2:]) != (h, w):
            cams = F.interpolate(cams[None], (h, w), mode="bilinear", align_corners=False)[0]
        return cams

    def _prompted(
        self,
        image: Tensor,
        prompts: Tensor,
        classes: Tensor,
        kind: PromptKind,
        num_classes: int,
        return_logits: bool,
    ) -> SamMasks:
        predictor = self.predictor
        predictor.set_image_tensor(image)
        size = predictor.original_size
        prompts = prompts.to(predictor.device)
        if kind is PromptKind.BOXES:
            boxes = predictor.transform.apply_boxes_torch(prompts, size)
            logits, iou, _ = predictor.predict_torch(
                None, None, boxes=boxes, multimask_output=False, return_logits=True
            )
            logits, scores = logits[:, 0], iou[:, 0]
        else:
            coords = predictor.transform.apply_coords_torch(prompts, size)[:, None, :]
            ones = torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device)
            logits, iou, _ = predictor.predict_torch(coords, ones, multimask_output=True, return_logits=True)
            best = iou.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            logits, scores = logits[rows, best], iou[rows, best]
        return SamMasks(
            masks=(logits > self.sam.model.mask_threshold).cpu(),
            scores=scores.cpu(),
            classes=classes,
            prompt=kind,
            num_classes=num_classes,
            logits=logits.cpu() if return_logits else None,
        )

    def _everything(self, image: Tensor) -> SamMasks:
        rgb = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        masks, scores = everything_masks(
            self.predictor,
            rgb,
            points_per_side=self.everything_points_per_side,
            pred_iou_thresh=self.everything_pred_iou_thresh,
            stability_score_thresh=self.everything_stability_thresh,
        )
        classes = torch.full((len(masks),), -1, dtype=torch.int64)
        return SamMasks(
            masks=masks, scores=scores, classes=classes, prompt=PromptKind.EVERYTHING, num_classes=0
        )

    @staticmethod
    def _empty(h: int, w: int, kind: PromptKind, num_classes: int, return_logits: bool) -> SamMasks:
        return SamMasks(
            masks=torch.zeros(0, h, w, dtype=torch.bool),
            scores=torch.zeros(0),
            classes=torch.zeros(0, dtype=torch.int64),
            prompt=kind,
            num_classes=num_classes,
            logits=torch.zeros(0, h, w) if return_logits else None,
        )
