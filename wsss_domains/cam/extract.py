"""Class activation maps of every class of an image in one pass per scale.

The extractor runs each scale once on a batch of the image and its mirror, so the cost does not
grow with the number of present classes (unlike gradient-based CAMs, which need a backward pass
per class). Methods that compute maps differently subclass :class:`CamExtractor` and override
:meth:`CamExtractor.raw_maps`, in the style of pytorch-grad-cam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.settings import CAM_NORMALIZATIONS, DEFAULT_SCALES
from wsss_domains.data.windows import balanced_tile, grid_starts


def normalize_per_class(cams: Tensor, eps: float = 1e-5) -> Tensor:
    """Scale each class map to [0, 1] by its own maximum (maps are already rectified)."""
    peak = cams.flatten(-2).amax(dim=-1).clamp_min(eps)
    return cams / peak[..., None, None]


def min_max_per_class(cams: Tensor, eps: float = 1e-5) -> Tensor:
    """Shift each class map by its minimum, then divide by the shifted maximum (ToCo's and DuPL's
    ``cam_helper``: ``cam + max_pool(-cam)``, ``cam / (max + eps)``)."""
    shifted = cams - cams.flatten(-2).amin(dim=-1)[..., None, None]
    return shifted / (shifted.flatten(-2).amax(dim=-1)[..., None, None] + eps)


class CamExtractor:
    """Multi-scale, flip-augmented CAMs for all classes, tiled when an image is large.

    ``normalization``: ``"max"`` (the classic CAM: rectify, divide each class map by its maximum)
    or ``"sigmoid"`` (average the un-rectified per-pixel class logits and squash them with the
    sigmoid the classifier was trained with — classes stay comparable to each other, which suits
    texture-like domains where every pixel belongs to some class).
    """

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[float] = DEFAULT_SCALES,
        flip: bool = True,
        base_scale: float = 1.0,
        tile_size: int = 1024,
        tile_overlap: int = 64,
        normalization: str = "max",
    ) -> None:
        if normalization not in CAM_NORMALIZATIONS:
            raise ValueError(f"unknown CAM normalization '{normalization}' ({', '.join(CAM_NORMALIZATIONS)})")
        self.normalization = normalization
        self.model = model
        self.scales = tuple(scales)
        self.flip = flip
        self.base_scale = base_scale
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        # A faster forward of the same CAM pass (ONNX Runtime), set by :meth:`use_runtime`.
        self.fast_cams: Callable[[Tensor], Tensor] | None = None

    def raw_maps(self, batch: Tensor) -> Tensor:
        """Class maps ``B x K x h x w`` for a normalised batch (the override point).

        Rectified for ``"max"`` normalisation, raw logits for ``"sigmoid"``.
        """
        if self.fast_cams is not None:
            return self.fast_cams(batch).to(batch.device)
        return self.model.cams(batch, rectify=self.normalization == "max")

    def use_runtime(self, runtime: str, cache: Path | None = None, arena: bool = True) -> bool:
        """Run the CAM pass in ``runtime`` (see :mod:`wsss_domains.models.runtime`); True if it does.

        Only the plain CAM pass is exported: an extractor that overrides :meth:`raw_maps` (CLIP,
        SAM-derived maps) keeps its own computation.
        """
        from wsss_domains.models.runtime import CamsForward, fast_forward

        if type(self).raw_maps is not CamExtractor.raw_maps or not hasattr(self.model, "head"):
            return False
        example = torch.randn(2, 3, 96, 96, device=next(self.model.parameters()).device)
        module = CamsForward(self.model, rectify=self.normalization == "max")
        self.fast_cams = fast_forward(module, example, runtime, dynamic=(0, 2, 3), cache=cache, arena=arena)
        return self.fast_cams is not None

    def _maps_at_size(self, image: Tensor) -> Tensor:
        """Maps of one (already scaled) image, upsampled to its size, flips averaged in."""
        batch = image[None]
        if self.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        maps = self.raw_maps(batch)
        maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.merge_flips(maps[0], maps[1].flip(-1)) if self.flip else maps[0]

    def merge_flips(self, maps: Tensor, mirrored: Tensor) -> Tensor:
        """One ``K x h x w`` map from an image's maps and its mirror's (mirrored back): their sum."""
        return maps + mirrored

    def _tiled(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        if max(h, w) <= self.tile_size:
            return self._maps_at_size(image)
        th, tw = (
            balanced_tile(h, self.tile_size, self.tile_overlap),
            balanced_tile(w, self.tile_size, self.tile_overlap),
        )
        out: Tensor | None = None
        weight = torch.zeros((h, w), device=image.device)
        for y in grid_starts(h, th, th - self.tile_overlap):
            for x in grid_starts(w, tw, tw - self.tile_overlap):
                tile = image[:, y : y + th, x : x + tw]
                maps = self._maps_at_size(tile)
                if out is None:
                    out = torch.zeros((maps.shape[0], h, w), device=image.device)
                out[:, y : y + tile.shape[1], x : x + tile.shape[2]] += maps
                weight[y : y + tile.shape[1], x : x + tile.shape[2]] += 1
        assert out is not None
        return out / weight

    def training_view(self, image: Tensor) -> Tensor:
        """``1 x 3 x h x w``: a normalised image at the magnification the classifier trained at.

        For methods that read the classifier's features beside its CAMs (prototype methods).
        """
        x = image[None]
        if self.base_scale != 1.0:
            h, w = image.shape[-2:]
            size = (max(1, round(h * self.base_scale)), max(1, round(w * self.base_scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def stage_features(self, image: Tensor, stage: int) -> Tensor:
        """``1 x D x h x w`` features of backbone stage ``stage`` for a normalised ``3 x H x W`` image.

        Taken at the training magnification and flip-averaged like the CAMs, for methods that
        describe pixels by the classifier's intermediate features (cam-proto, seed-probe).
        """
        return self.stages_features(image, [stage])[0]

    @torch.no_grad()
    def stages_features(self, image: Tensor, stages: Sequence[int]) -> list[Tensor]:
        """:meth:`stage_features` of several stages from one backbone pass, in ``stages`` order."""
        from wsss_domains.models.stages import capture_stages

        x = self.training_view(image)
        batch = torch.cat([x, x.flip(-1)]) if self.flip else x
        with capture_stages(self.model.backbone, list(stages)) as captured:
            self.model.features(batch)
        out = []
        for feats in captured:
            if self.flip:
                feats = (feats[:1] + feats[1:].flip(-1)) / 2
            out.append(feats.float())
        return out

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        """Per-class CAMs ``K x H x W`` in [0, 1] for a normalised ``3 x H x W`` image."""
        return self.normalize(self.maps(image))

    def normalize(self, total: Tensor) -> Tensor:
        """Summed maps (see :meth:`maps`) to [0, 1]: per-class maximum, or sigmoid of the mean logit.

        The sigmoid needs no image-wide statistic, so windows of a large raster normalise exactly.
        """
        if self.normalization == "sigmoid":
            return torch.sigmoid(total / (len(self.scales) * (2 if self.flip else 1)))
        return normalize_per_class(total)

    @torch.no_grad()
    def maps(self, image: Tensor) -> Tensor:
        """The maps before normalisation (summed over scales and flips), ``K x H x W``.

        Separate so that a caller seeing an image window by window can normalise by maxima taken
        over more than one window (see :mod:`wsss_domains.pseudo_labels.raster`).
        """
        h, w = image.shape[-2:]
        total: Tensor | None = None
        for scale in self.scales:
            s = scale * self.base_scale
            size = (max(1, round(h * s)), max(1, round(w * s)))
            scaled = (
                image
                if size == (h, w)
                else F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            )
            maps = self._tiled(scaled)
            if size != (h, w):
                maps = F.interpolate(maps[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            total = maps if total is None else total + maps
        assert total is not None
        return total
