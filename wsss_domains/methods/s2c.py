"""``s2c``: S2C's SAM-guided CAM training (Kweon & Yoon, "From SAM to CAMs", CVPR 2024).

Follows ``models/model_s2c.py`` (``model_WSSS.update``) of github.com/sangrockEG/S2C. Training adds
two losses to the classification loss (:mod:`wsss_domains.sam.s2c`):

* ``ssc`` (weight ``ssc_weight``, 1): SAM-segment contrast of the classifier's features (the map
  its CAM head reads), temperature ``temperature`` (1, the reference's ``T``), the softmax over all
  prototypes including "no segment" and the zero padding to the batch's largest segment count, as
  the reference (``ssc_mask_absent`` drops those, the former rule). Segments come from SAM's
  everything mode, painted as ``get_se_map.py`` does (the highest predicted IoU wins overlaps;
  ``segment_order=area``: the smaller mask wins, the former rule), or -- for a box-only SAM such as
  LiteMedSAM -- from the masks of the CAM-box prompts below;
* ``cpm`` (weight ``cpm_weight``, 1): the CAMs are supervised with SAM masks prompted from the
  multi-scale CAMs (scales ``cpm_scales``, 0.5/1/1.5/2): for a point-capable SAM one prompt per
  class holding all its CAM peaks, keeping SAM's third (whole-object) mask (``cpm_mask_index`` 2,
  the reference's choice); for a box-only SAM one box per CAM region. Peaks follow the reference
  (:func:`~wsss_domains.sam.prompts.s2c_peaks`): the global maximum plus every
  ``peak_local_max(min_distance=min_peak_distance)`` peak (20 px) of the 3 x 3 max-filtered CAM
  above ``peak_threshold`` (0.5, ``th_multi``), no cap; ``peak_rule=domain`` restores the former
  rule (the domain's ``SamStrategy.peak_threshold`` and ``max_prompts_per_class``). CPM starts once
  ``cpm_start`` (0.05) of the training budget is spent -- the reference's two warm-up epochs of
  forty -- as early CAMs prompt SAM at random.

Departures from the reference: SSC runs at ``1/ssc_stride`` (4) of the input, for memory
(``ssc_stride=1``: full resolution, as the reference); SAM sees the augmented view itself, so the
everything-mode segments are recomputed per view rather than precomputed once per image and
augmented; peak ties (a 3 x 3 plateau after the max filter) go to the first pixel in raster order,
as scikit-image 0.26 (the reference's pinned 0.21 orders ties by NumPy's unstable quicksort).
Smaller ones, kept for now: SAM's input is made by its predictor (the reference resizes to
1024 x 1024 with ``align_corners=True``), the CPM confidence uses SAM's full-resolution logits (the
reference: its 256 x 256 logits resized bilinearly) and the prompting CAMs resize the images with
``align_corners=False`` (the reference: True).

The image SAM sees is the batch de-normalised with the run's mean and std (after augmentation, so
masks and features stay aligned). At pseudo-label time S2C is plain multi-scale CAM followed by
SEPL: the reference's README sends its CAMs to SEPL's code (SAM_WSSS), whose default merge
(``merge/max_iou_imp2.py``) :func:`~wsss_domains.sam.sepl_merge.sepl_refine` follows.

Cost: per training image one SAM image-encoder pass, the prompt decoder for each prompted class
(plus SAM's automatic mask generator, 32 x 32 point grid, for point-capable SAMs) and four extra
classifier forward passes at up to 2x resolution for the prompting CAMs. Measured on 2 shared CPU
cores with LiteMedSAM: about 4 s per 224 px training image (10 s while the first embeddings and
kernels warm up), so a step of 32 images takes about 2 minutes: train s2c on a GPU, or on CPU only
with small batches and a long budget. Training views are not cached on disk by default
(``train_cache``): histology's colour jitter makes every view new, and each LiteMedSAM or ViT-B
embedding is 4 MiB. Turn it on for domains whose augmentation has few distinct views (flips), where
embeddings are then reused from the second epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from wsss_domains.domains.contract import PromptKind, SamStrategy
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_base import LastEmbedding
from wsss_domains.methods.sepl import SeplRefinement
from wsss_domains.training.data import denormalize

if TYPE_CHECKING:
    from wsss_domains.sam.segmenter import SamSegmenter

CPM_SCALES = (0.5, 1.0, 1.5, 2.0)
CPM_START = 0.05
CPM_MASK_INDEX = 2
MIN_PEAK_DISTANCE = 20
PEAK_THRESHOLD = 0.5  # the reference's th_multi
SSC_STRIDE = 4


def to_uint8_rgb(image: Tensor) -> Any:
    """``H x W x 3`` uint8 array of a [0, 1] image, exactly as SamSegmenter's everything mode makes it."""
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class _TargetSetup(NamedTuple):
    """What every image of a training batch shares when its SAM targets are made."""

    segmenter: SamSegmenter
    strategy: SamStrategy
    with_cpm: bool


@register_method
class S2C(SeplRefinement):
    name = "s2c"
    description = (
        "S2C: SAM-segment feature contrast + CAM-peak-prompted SAM masks supervising the CAMs in training;"
        " CAM + SEPL at pseudo-label time. Needs a SAM checkpoint; slow on CPU."
    )
    deviations = (
        "SAM's input resized by its predictor (not straight to 1024x1024, corners aligned); CPM confidence"
        " from full-resolution logits; multi-scale CAMs without aligned corners; SSC at 1/4 resolution"
        " (ssc_stride=1: the official full resolution); CNN backbones"
    )

    def __init__(
        self,
        ssc_weight: float = 1.0,
        cpm_weight: float = 1.0,
        temperature: float = 1.0,
        ssc_stride: int = SSC_STRIDE,
        ssc_mask_absent: bool = False,
        segment_order: Literal["score", "area"] = "score",
        cpm_start: float = CPM_START,
        cpm_scales: Sequence[float] = CPM_SCALES,
        cpm_mask_index: int = CPM_MASK_INDEX,
        peak_rule: Literal["official", "domain"] = "official",
        peak_threshold: float = PEAK_THRESHOLD,
        min_peak_distance: int = MIN_PEAK_DISTANCE,
        train_cache: bool = False,
        **sam_options: Any,
    ) -> None:
        if segment_order not in ("score", "area"):
            raise ValueError(f"s2c: segment_order must be 'score' or 'area', got {segment_order!r}")
        if peak_rule not in ("official", "domain"):
            raise ValueError(f"s2c: peak_rule must be 'official' or 'domain', got {peak_rule!r}")
        if ssc_stride < 1 or min_peak_distance < 1:
            raise ValueError("s2c: ssc_stride and min_peak_distance must be >= 1")
        super().__init__(
            ssc_weight=ssc_weight,
            cpm_weight=cpm_weight,
            temperature=temperature,
            ssc_stride=ssc_stride,
            ssc_mask_absent=ssc_mask_absent,
            segment_order=segment_order,
            cpm_start=cpm_start,
            cpm_scales=[float(x) for x in cpm_scales],
            cpm_mask_index=cpm_mask_index,
            peak_rule=peak_rule,
            peak_threshold=peak_threshold,
            min_peak_distance=min_peak_distance,
            train_cache=train_cache,
            **sam_options,
        )
        self.ssc_weight, self.cpm_weight = float(ssc_weight), float(cpm_weight)
        self.temperature, self.ssc_stride = float(temperature), int(ssc_stride)
        self.ssc_mask_absent, self.segment_order = bool(ssc_mask_absent), segment_order
        self.cpm_start, self.cpm_scales = float(cpm_start), tuple(float(x) for x in cpm_scales)
        self.cpm_mask_index, self.peak_rule = int(cpm_mask_index), peak_rule
        self.peak_threshold, self.min_peak_distance = float(peak_threshold), int(min_peak_distance)
        self.train_cache = bool(train_cache)

    def training_segmenter(self, device: torch.device) -> SamSegmenter:
        """The method's segmenter; its disk cache only with ``train_cache`` (views rarely repeat)."""
        if self._cache is None and not self.train_cache:
            self._cache = LastEmbedding(None)
        return self.segmenter(device)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        from wsss_domains.sam.s2c import cpm_loss, multiscale_cams, segment_index_map, ssc_loss

        if self.mean is None or self.std is None:
            raise RuntimeError("s2c: call setup(domain, mean, std) before training (the engine does)")
        images, labels = batch["image"], batch["label"]
        progress = float(batch["progress"]) if "progress" in batch else 1.0
        with_cpm = progress >= self.cpm_start
        segmenter = self.training_segmenter(images.device)
        strategy = self.strategy()
        box_only = not segmenter.sam.supports_points
        cams = None
        if with_cpm or box_only:
            cams = multiscale_cams(model, images, labels, self.cpm_scales)
        raw = denormalize(images.detach(), self.mean, self.std).clamp(0.0, 1.0)
        setup = _TargetSetup(segmenter, strategy, with_cpm)
        targets_of = self._box_targets if box_only else self._point_targets
        seg_maps, targets = [], []
        for i in range(images.shape[0]):
            cam_i = cams[i] if cams is not None else None
            masks, scores, target = targets_of(setup, raw[i], cam_i, labels[i])
            seg_maps.append(segment_index_map(masks, scores if self.segment_order == "score" else None))
            targets.append(target)
        stride = self.ssc_stride
        segments = torch.stack(seg_maps).to(images.device)[:, stride // 2 :: stride, stride // 2 :: stride]
        losses = {
            "ssc": self.ssc_weight
            * ssc_loss(outputs["features"], segments, self.temperature, mask_absent=self.ssc_mask_absent)
        }
        if with_cpm:
            target_maps = torch.stack(targets).to(images.device)  # type: ignore[arg-type]
            losses["cpm"] = self.cpm_weight * cpm_loss(outputs["cams"], labels, target_maps)
        else:
            losses["cpm"] = outputs["logits"].new_zeros(())
        return losses

    @torch.no_grad()
    def _box_targets(
        self, setup: _TargetSetup, image: Tensor, cams: Tensor | None, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Box-only SAM: one mask per CAM-region box; the masks (and scores) are also SSC's segments."""
        from wsss_domains.sam.s2c import cpm_target

        assert cams is not None
        out = setup.segmenter.segment(
            image, cams, replace(setup.strategy, prompt=PromptKind.BOXES), labels=labels, return_logits=True
        )
        if not setup.with_cpm:
            return out.masks, out.scores, None
        assert out.logits is not None
        k = cams.shape[0]
        logits = torch.full((k, *out.logits.shape[-2:]), float("-inf"))
        for c in out.classes.unique().tolist():
            logits[c] = out.logits[out.classes == c].amax(dim=0)
        return out.masks, out.scores, cpm_target(logits, cams.cpu(), background=k)

    def point_prompts(self, cam: Tensor, strategy: SamStrategy) -> Tensor:
        """``M x 2`` float ``(x, y)`` point prompts for one class's CAM (image frame).

        ``peak_rule=official``: :func:`~wsss_domains.sam.prompts.s2c_peaks` at the peak pixels'
        indices, as the reference scales them to SAM's input; ``domain``: the former
        :func:`~wsss_domains.sam.prompts.cam_peaks` with the domain's threshold and cap, at pixel
        centres.
        """
        from wsss_domains.sam.prompts import cam_peaks, s2c_peaks

        if self.peak_rule == "domain":
            return cam_peaks(
                cam, strategy.peak_threshold, self.min_peak_distance, strategy.max_prompts_per_class
            )
        return s2c_peaks(cam, self.peak_threshold, self.min_peak_distance).flip(1).float()

    @torch.no_grad()
    def _point_targets(
        self, setup: _TargetSetup, image: Tensor, cams: Tensor | None, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Point-capable SAM: everything-mode segments; one multi-point prompt per present class."""
        from wsss_domains.sam.s2c import cpm_target

        target = None
        rgb = to_uint8_rgb(image)
        if setup.with_cpm:
            assert cams is not None
            predictor = setup.segmenter.predictor
            predictor.set_image(rgb)  # the same encoder input as everything mode's: encoded once
            k = cams.shape[0]
            h, w = image.shape[-2:]
            logits = torch.full((k, h, w), float("-inf"))
            for c in torch.nonzero(labels > 0).flatten().tolist():
                peaks = self.point_prompts(cams[c].cpu(), setup.strategy)
                if not len(peaks):
                    continue
                coords = predictor.transform.apply_coords_torch(peaks.to(predictor.device), (h, w))[None]
                ones = torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device)
                masks, _, _ = predictor.predict_torch(coords, ones, multimask_output=True, return_logits=True)
                logits[c] = masks[0, self.cpm_mask_index].cpu()
            target = cpm_target(logits, cams.cpu(), background=k)
        everything = setup.segmenter.segment(
            image, None, replace(setup.strategy, prompt=PromptKind.EVERYTHING)
        )
        return everything.masks, everything.scores, target
