"""``s2c``: S2C's SAM-guided CAM training (Kweon & Yoon, "From SAM to CAMs", CVPR 2024).

Training adds two losses to the classification loss (:mod:`wsss_domains.sam.s2c`):

* ``ssc`` (weight ``ssc_weight``, 1): SAM-segment contrast of the classifier's features (the map
  its CAM head reads). Segments come from SAM's everything mode, or -- for a box-only SAM such as
  LiteMedSAM -- from the masks of the CAM-box prompts below; computed at ``1/ssc_stride`` (4) of
  the input with temperature ``temperature`` (1, the reference's);
* ``cpm`` (weight ``cpm_weight``, 1): the CAMs are supervised with SAM masks prompted from the
  multi-scale CAMs (scales ``cpm_scales``, 0.5/1/1.5/2): for a point-capable SAM one prompt per
  class holding all its CAM peaks (the domain's ``peak_threshold`` and ``max_prompts_per_class``,
  at least ``min_peak_distance`` = 20 px apart), keeping SAM's third (whole-object) mask
  (``cpm_mask_index`` 2, the reference's choice); for a box-only SAM one box per CAM region. It
  starts once ``cpm_start`` (0.05) of the training budget is spent -- the reference's two warm-up
  epochs of forty -- as early CAMs prompt SAM at random.

The image SAM sees is the batch de-normalised with the run's mean and std (after augmentation, so
masks and features stay aligned). At pseudo-label time S2C is plain multi-scale CAM followed by
SEPL: the reference's README sends its CAMs to SEPL's code (SAM_WSSS) for refinement.

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

from dataclasses import replace
from typing import TYPE_CHECKING, Any

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
SSC_STRIDE = 4


def to_uint8_rgb(image: Tensor) -> Any:
    """``H x W x 3`` uint8 array of a [0, 1] image, exactly as SamSegmenter's everything mode makes it."""
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@register_method
class S2C(SeplRefinement):
    name = "s2c"
    description = (
        "S2C: SAM-segment feature contrast + CAM-peak-prompted SAM masks supervising the CAMs in training;"
        " CAM + SEPL at pseudo-label time. Needs a SAM checkpoint; slow on CPU."
    )

    def __init__(self, **options: Any) -> None:
        options.setdefault("min_peak_distance", MIN_PEAK_DISTANCE)
        super().__init__(**options)

    def training_segmenter(self, device: torch.device) -> SamSegmenter:
        """The method's segmenter; its disk cache only with ``train_cache`` (views rarely repeat)."""
        if self._cache is None and not bool(self.options.get("train_cache", False)):
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
        with_cpm = progress >= float(self.options.get("cpm_start", CPM_START))
        segmenter = self.training_segmenter(images.device)
        strategy = self.strategy()
        box_only = not segmenter.sam.supports_points
        cams = None
        if with_cpm or box_only:
            scales = tuple(float(s) for s in self.options.get("cpm_scales", CPM_SCALES))
            cams = multiscale_cams(model, images, labels, scales)
        raw = denormalize(images.detach(), self.mean, self.std).clamp(0.0, 1.0)
        segments, targets = [], []
        for i in range(images.shape[0]):
            cam_i = cams[i] if cams is not None else None
            if box_only:
                seg, target = self._box_targets(segmenter, raw[i], cam_i, labels[i], strategy, with_cpm)
            else:
                seg, target = self._point_targets(segmenter, raw[i], cam_i, labels[i], strategy, with_cpm)
            segments.append(seg)
            targets.append(target)
        stride = int(self.options.get("ssc_stride", SSC_STRIDE))
        seg_maps = torch.stack([segment_index_map(s) for s in segments]).to(images.device)
        seg_maps = seg_maps[:, stride // 2 :: stride, stride // 2 :: stride]
        temperature = float(self.options.get("temperature", 1.0))
        losses = {
            "ssc": float(self.options.get("ssc_weight", 1.0))
            * ssc_loss(outputs["features"], seg_maps, temperature)
        }
        if with_cpm:
            target_maps = torch.stack(targets).to(images.device)  # type: ignore[arg-type]
            losses["cpm"] = float(self.options.get("cpm_weight", 1.0)) * cpm_loss(
                outputs["cams"], labels, target_maps
            )
        else:
            losses["cpm"] = outputs["logits"].new_zeros(())
        return losses

    @torch.no_grad()
    def _box_targets(
        self,
        segmenter: SamSegmenter,
        image: Tensor,
        cams: Tensor | None,
        labels: Tensor,
        strategy: SamStrategy,
        with_cpm: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Box-only SAM: one mask per CAM-region box; the masks are also SSC's segments."""
        from wsss_domains.sam.s2c import cpm_target

        assert cams is not None
        out = segmenter.segment(
            image, cams, replace(strategy, prompt=PromptKind.BOXES), labels=labels, return_logits=True
        )
        if not with_cpm:
            return out.masks, None
        assert out.logits is not None
        k = cams.shape[0]
        logits = torch.full((k, *out.logits.shape[-2:]), float("-inf"))
        for c in out.classes.unique().tolist():
            logits[c] = out.logits[out.classes == c].amax(dim=0)
        return out.masks, cpm_target(logits, cams.cpu(), background=k)

    @torch.no_grad()
    def _point_targets(
        self,
        segmenter: SamSegmenter,
        image: Tensor,
        cams: Tensor | None,
        labels: Tensor,
        strategy: SamStrategy,
        with_cpm: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Point-capable SAM: everything-mode segments; one multi-point prompt per present class."""
        from wsss_domains.sam.prompts import cam_peaks
        from wsss_domains.sam.s2c import cpm_target

        target = None
        rgb = to_uint8_rgb(image)
        if with_cpm:
            assert cams is not None
            predictor = segmenter.predictor
            predictor.set_image(rgb)  # the same encoder input as everything mode's: encoded once
            k = cams.shape[0]
            h, w = image.shape[-2:]
            logits = torch.full((k, h, w), float("-inf"))
            index = int(self.options.get("cpm_mask_index", CPM_MASK_INDEX))
            distance = int(self.options.get("min_peak_distance", MIN_PEAK_DISTANCE))
            for c in torch.nonzero(labels > 0).flatten().tolist():
                peaks = cam_peaks(
                    cams[c].cpu(), strategy.peak_threshold, distance, strategy.max_prompts_per_class
                )
                if not len(peaks):
                    continue
                coords = predictor.transform.apply_coords_torch(peaks.to(predictor.device), (h, w))[None]
                ones = torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device)
                masks, _, _ = predictor.predict_torch(coords, ones, multimask_output=True, return_logits=True)
                logits[c] = masks[0, index].cpu()
            target = cpm_target(logits, cams.cpu(), background=k)
        everything = segmenter.segment(image, None, replace(strategy, prompt=PromptKind.EVERYTHING))
        return everything.masks, target
