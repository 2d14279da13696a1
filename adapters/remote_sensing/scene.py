"""One scene on disk (an image raster and its optional mask raster) read as contract samples.

Every loader only lists its scenes; reading a window of a scene into a :class:`Sample`, checking
that image and mask agree in size, turning no-data into ``exclude`` and the ignore label, and
finding which tiles hold any labelled pixel are shared here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import MaskCode
from wsss_domains.data.windows import TileWindow
from wsss_domains.domains.contract import LabelSpace, Sample

if TYPE_CHECKING:
    from torch import Tensor

    from wsss_domains.data.raster_reader import Scaling


@dataclass(frozen=True)
class Scene:
    """An image file, its mask file if annotated, and what the loader knows about it."""

    id: str
    image: Path
    mask: Path | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadOptions:
    """How a dataset's rasters are read: mask code, band selection and scaling."""

    code: MaskCode
    bands: tuple[int, ...] | None = None
    scaling: Scaling = "auto"
    # A class enters a label only if it covers this share of the scored pixels (see patches.py).
    min_fraction: float = 0.0


class SceneReader:
    """Reads windows of one scene; opens only the raster headers until asked for pixels."""

    def __init__(self, scene: Scene, label_space: LabelSpace, options: ReadOptions) -> None:
        from wsss_domains.data.raster_reader import (  # rasterio and torch: only when read
            ImageRaster,
            MaskRaster,
        )

        self.scene = scene
        self.label_space = label_space
        self.min_fraction = options.min_fraction
        self.image = ImageRaster(scene.image, options.bands, options.scaling)
        self.mask = None if scene.mask is None else MaskRaster(scene.mask, options.code)
        if self.mask is not None and self.mask.info.size != self.image.info.size:
            raise DataError(
                scene.mask,
                f"mask size {self.mask.info.size} does not match image size {self.image.info.size}"
                f" ({scene.image.name})",
            )

    @property
    def size(self) -> tuple[int, int]:
        return self.image.info.size

    def read(self, window: TileWindow | None = None) -> Sample:
        """The sample of one window (the whole scene when None); no ``label`` without a mask."""
        image, nodata = self.image.read(window)
        meta: dict[str, Any] = {
            **self.scene.meta,
            "path": str(self.scene.image),
            "full_size": self.size,
        }
        sample: Sample = {"image": image, "id": self.scene.id, "meta": meta}
        if nodata is not None:
            sample["exclude"] = nodata
        if self.mask is not None:
            mask = self.mask.read(window)
            if nodata is not None:
                mask[nodata] = self.label_space.ignore_index
            sample["mask"] = mask
            from wsss_domains.data.patches import label_from_crop

            sample["label"] = label_from_crop(self.label_space, mask, min_fraction=self.min_fraction)
        return sample

    def scored_mask(self) -> Tensor | None:
        """The whole mask with no-data as ignore, without decoding the image (None if unannotated)."""
        import torch

        if self.mask is None:
            return None
        mask = self.mask.read()
        nodata = self.image.nodata()
        if nodata is not None:
            mask[torch.from_numpy(nodata)] = self.label_space.ignore_index
        return mask

    def labelled(self, windows: Sequence[TileWindow]) -> list[bool]:
        """Whether each window holds a scored pixel (mask not ignore, image not no-data).

        Reads full-width strips, one per row of windows, so a raster is scanned once with
        ``tile x width`` pixels in memory, and unknown mask codes surface before training.
        """
        if self.mask is None and not self.image.info.has_nodata:
            return [True] * len(windows)
        width = self.size[1]
        rows: dict[tuple[int, int], list[int]] = {}
        for i, w in enumerate(windows):
            rows.setdefault((w.row, w.height), []).append(i)
        keep = [False] * len(windows)
        for (row, height), members in rows.items():
            strip = TileWindow(row, 0, height, width)
            scored = np.ones((height, width), dtype=bool)
            if self.mask is not None:
                scored &= self.mask.read(strip).numpy() != self.label_space.ignore_index
            nodata = self.image.nodata(strip)
            if nodata is not None:
                scored &= ~nodata
            for i in members:
                w = windows[i]
                keep[i] = bool(scored[:, w.col : w.col + w.width].any())
        return keep
