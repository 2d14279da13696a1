"""Whole-slide images (``.svs``, pyramidal ``.tif``, ...) segmented over tissue only.

A slide is read through ``tiffslide`` at one pyramid level, chosen directly (``level``) or as the
level closest to a resolution in microns per pixel (``mpp``; the level is then resampled to that
resolution exactly). Tissue is found once on a thumbnail with the domain's own background rule
(white glass in histology): windows without tissue are written as unscored and never reach the
network. The result is a pyramidal palette TIFF at the chosen resolution (see
:mod:`wsss_domains.segmentation.raster`) plus a PNG thumbnail of the labels over the slide.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.data.io import DataError, atomic_write
from wsss_domains.data.windows import TileWindow
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".ome.tif", ".ome.tiff")
THUMBNAIL_SIZE = 1024


class SlideSource:
    """One level of a slide, optionally resampled to ``mpp``, with a tissue map from its thumbnail."""

    def __init__(
        self,
        path: Path,
        domain: DomainPlugin,
        label_space: LabelSpace,
        *,
        level: int | None = None,
        mpp: float | None = None,
    ) -> None:
        import tiffslide

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "slide not found")
        try:
            self.slide = tiffslide.TiffSlide(str(self.path))
        except Exception as exc:  # tiffslide raises several types for files it cannot read
            raise DataError(self.path, f"unreadable slide ({type(exc).__name__}: {exc})") from exc
        if level is not None and mpp is not None:
            raise UserError("give a slide level or a resolution in microns per pixel, not both")
        self.level, self.factor, self.mpp = self._resolution(level, mpp)
        w, h = self.slide.level_dimensions[self.level]
        self.size = (max(1, round(h * self.factor)), max(1, round(w * self.factor)))
        self.tissue = self._tissue_map(domain, label_space)

    def _resolution(self, level: int | None, mpp: float | None) -> tuple[int, float, float | None]:
        """(level read, resampling factor applied to it, resulting microns per pixel or None)."""
        base = self.slide.properties.get("tiffslide.mpp-x")
        downsamples = self.slide.level_downsamples
        if mpp is None:
            level = 0 if level is None else level
            if not 0 <= level < len(downsamples):
                raise UserError(f"{self.path}: level {level} does not exist (0..{len(downsamples) - 1})")
            return level, 1.0, None if base is None else float(base) * downsamples[level]
        if mpp <= 0:
            raise UserError(f"--mpp must be positive, got {mpp}")
        if base is None:
            raise DataError(self.path, "records no microns per pixel; choose a --level instead of --mpp")
        wanted = mpp / float(base)  # downsample from level 0
        # The finest level that is not coarser than asked, then resampled down to it.
        candidates = [i for i, d in enumerate(downsamples) if d <= wanted * (1 + 1e-6)]
        level = max(candidates, key=lambda i: downsamples[i]) if candidates else 0
        return level, downsamples[level] / wanted, mpp

    def _tissue_map(self, domain: DomainPlugin, label_space: LabelSpace) -> np.ndarray | None:
        """A coarse boolean tissue map of the whole slide (None: the domain excludes nothing)."""
        thumb = self.slide.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).convert("RGB")
        self.thumbnail = np.asarray(thumb)
        image = torch.from_numpy(self.thumbnail.copy()).permute(2, 0, 1).float() / 255.0
        exclude = domain.exclude_mask(image, label_space)
        return None if exclude is None else ~exclude.cpu().numpy()

    def _thumb_box(self, window: TileWindow) -> tuple[slice, slice]:
        th, tw = self.thumbnail.shape[:2]
        sy, sx = th / self.size[0], tw / self.size[1]
        r0, c0 = int(window.row * sy), int(window.col * sx)
        r1 = max(r0 + 1, math.ceil((window.row + window.height) * sy))
        c1 = max(c0 + 1, math.ceil((window.col + window.width) * sx))
        return slice(r0, r1), slice(c0, c1)

    def skip(self, window: TileWindow) -> bool:
        if self.tissue is None:
            return False
        rows, cols = self._thumb_box(window)
        return not bool(self.tissue[rows, cols].any())

    def read(self, window: TileWindow) -> tuple[Tensor, Tensor | None]:
        f = self.factor
        # The window in the level's own pixels, then in level-0 coordinates (tiffslide's convention).
        col, row = math.floor(window.col / f), math.floor(window.row / f)
        width = max(1, math.ceil((window.col + window.width) / f) - col)
        height = max(1, math.ceil((window.row + window.height) / f) - row)
        w_level, h_level = self.slide.level_dimensions[self.level]
        width, height = min(width, w_level - col), min(height, h_level - row)
        down = self.slide.level_downsamples[self.level]
        region = self.slide.read_region(
            (round(col * down), round(row * down)), self.level, (width, height), as_array=True
        )
        image = torch.from_numpy(np.ascontiguousarray(region[..., :3])).permute(2, 0, 1).float() / 255.0
        if f != 1.0 or tuple(image.shape[-2:]) != (window.height, window.width):
            image = F.interpolate(
                image[None], size=(window.height, window.width), mode="bilinear", align_corners=False
            )[0].clamp_(0.0, 1.0)
        return image, None

    def identity(self) -> dict[str, Any]:
        stat = self.path.stat()
        return {
            "path": str(self.path.resolve()),
            "stamp": [stat.st_size, stat.st_mtime_ns],
            "level": self.level,
            "factor": self.factor,
        }

    def georeferenced(self) -> Path | None:
        return None

    def close(self) -> None:
        self.slide.close()


def write_thumbnail_overlay(
    labels_tif: Path, thumbnail: np.ndarray, label_space: LabelSpace, out: Path, alpha: float = 0.5
) -> None:
    """The slide thumbnail with the predicted classes blended over it (unscored pixels left bare)."""
    import rasterio
    from rasterio.enums import Resampling

    h, w = thumbnail.shape[:2]
    with rasterio.open(labels_tif) as src:
        ids = src.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    palette = np.asarray(label_space.flat_palette(), dtype=np.float32).reshape(-1, 3)
    colours = palette[ids]
    scored = (ids != label_space.ignore_index)[..., None]
    blended = np.where(scored, thumbnail * (1 - alpha) + colours * alpha, thumbnail).astype(np.uint8)
    picture = Image.fromarray(blended)
    atomic_write(out, lambda tmp: picture.save(tmp, format="PNG"))
