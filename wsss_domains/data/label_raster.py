"""Class-id rasters written window by window: the plan of windows, the GeoTIFF, resuming.

Pseudo-labelling a raster and predicting one with the segmenter both cut a raster of any size into
*core* windows of ``window`` pixels, each read with a *context* of ``margin`` pixels a side, and
write only the cores into a tiled, compressed, single-band palette GeoTIFF that keeps the source's
georeferencing. The output grows in a temporary file beside it; a progress record (JSON) is saved
after each row of windows, so a killed run resumes where it stopped; a summary beside the finished
output records what it was made from (a fingerprint), so the same job is not done twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetWriter
from torch import nn

from wsss_domains.data.io import atomic_write, save_palette_png
from wsss_domains.data.windows import TileWindow, WindowPair
from wsss_domains.domains.contract import LabelSpace

# GDAL's block cache counts in resident memory; its default (5 % of RAM) would dwarf one window.
GDAL_CACHE_MB = 64
OVERVIEW_SIZE = 2048
# GeoTIFF blocks must be multiples of 16; windows are cut on whole blocks.
BLOCK_SIZES = (512, 256, 128, 64, 32, 16)


def block_size(window: int) -> int:
    return next(b for b in BLOCK_SIZES if window % b == 0)


def sidecars(out: Path) -> tuple[Path, Path, Path]:
    """Temporary GeoTIFF, progress record and summary of an output."""
    return (
        out.with_name(f".{out.name}.part"),
        out.with_name(f".{out.name}.progress.json"),
        out.with_name(f"{out.name}.json"),
    )


def digest(*modules: nn.Module) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LabelFile:
    """The temporary label GeoTIFF, reopened at checkpoints so its directory reaches the disk."""

    def __init__(
        self,
        path: Path,
        profile: dict[str, Any],
        colormap: dict[int, tuple[int, ...]],
        tags: dict[str, str],
    ) -> None:
        self.path = path
        self.profile = profile
        self.colormap = colormap
        self.tags = tags
        self._dst: DatasetWriter | None = None

    def create(self) -> None:
        self._dst = rasterio.open(self.path, "w", **self.profile)
        self._dst.write_colormap(1, self.colormap)
        self._dst.update_tags(**self.tags)
        self._dst.set_band_description(1, "pseudo-label class id")

    def reopen(self) -> bool:
        """Open an existing temporary file for update; False when it is missing or not ours."""
        try:
            dst = rasterio.open(self.path, "r+")
        except (RasterioIOError, OSError):
            return False
        if (dst.height, dst.width, dst.count, dst.dtypes[0]) != (
            self.profile["height"],
            self.profile["width"],
            1,
            "uint8",
        ):
            dst.close()
            return False
        self._dst = dst
        return True

    def write(self, labels: np.ndarray, core: TileWindow) -> None:
        assert self._dst is not None
        self._dst.write(labels, 1, window=core.to_rasterio())

    def checkpoint(self) -> None:
        self.close()
        self._dst = rasterio.open(self.path, "r+")

    def close(self) -> None:
        if self._dst is not None:
            self._dst.close()
            self._dst = None


def label_file(
    tmp: Path,
    source: Path | None,
    size: tuple[int, int],
    label_space: LabelSpace,
    window: int,
    compress: str,
    tags: dict[str, str],
) -> tuple[LabelFile, str | None]:
    """The output's GeoTIFF settings: georeferencing of ``source`` (when it has any), palette, tiles
    on window steps, the label space and ``tags`` recorded as metadata."""
    crs, transform, gcps = None, rasterio.Affine.identity(), ([], None)
    if source is not None:
        with rasterio.open(source) as src:
            crs, transform, gcps = src.crs, src.transform, src.gcps
    block = block_size(window)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": size[0],
        "width": size[1],
        "count": 1,
        "dtype": "uint8",
        "nodata": label_space.ignore_index,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": compress,
        "BIGTIFF": "IF_SAFER",
    }
    if crs is not None or not transform.is_identity:
        profile.update(crs=crs, transform=transform)
    elif gcps[0]:
        profile.update(gcps=gcps[0], crs=gcps[1])
        crs = gcps[1]
    colormap = {i: tuple(rgb) for i, rgb in enumerate(label_space.palette)}
    colormap[label_space.ignore_index] = tuple(label_space.ignore_color)
    tags = {
        "classes": json.dumps(list(label_space.classes)),
        "ignore_index": str(label_space.ignore_index),
        **tags,
    }
    return LabelFile(tmp, profile, colormap, tags), None if crs is None else crs.to_string()


def rows_of_windows(plan: Sequence[WindowPair], todo: set[int]) -> Iterator[list[int]]:
    """Indices of the windows still to do, one row of windows at a time (a checkpoint after each)."""
    row: list[int] = []
    for i, pair in enumerate(plan):
        if row and plan[row[-1]].core.row != pair.core.row:
            yield row
            row = []
        if i in todo:
            row.append(i)
    if row:
        yield row


def load_progress(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return progress if progress.get("fingerprint") == fingerprint else None


def save_progress(
    path: Path,
    fingerprint: str,
    state: dict[str, Any],
    first: list[int] | None = None,
    second: list[int] | None = None,
) -> None:
    """Pass-1 state and finished windows; ``second`` not None means the first pass is complete."""
    text = json.dumps({"fingerprint": fingerprint, "state": state, "first": first, "second": second})
    atomic_write(path, lambda p: p.write_text(text))


def finished_summary(out: Path, summary_path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The recorded summary of an output already written from the same inputs, else None."""
    if not (out.is_file() and summary_path.is_file()):
        return None
    try:
        done = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None
    return done if done.get("fingerprint") == fingerprint else None


def write_overview(
    labels_tif: Path, plan: Sequence[WindowPair], out: Path, label_space: LabelSpace, size: int
) -> None:
    """A palette PNG of the label GeoTIFF, every ``f``-th pixel (nearest), longest side <= ``size``.

    Read core by core so only one window and the small overview are held.
    """
    with rasterio.open(labels_tif) as src:
        height, width = src.height, src.width
        f = max(1, math.ceil(max(height, width) / size))
        overview = np.full((math.ceil(height / f), math.ceil(width / f)), label_space.ignore_index, np.uint8)
        for pair in plan:
            core = pair.core
            r0, c0 = -(-core.row // f), -(-core.col // f)
            r1, c1 = -(-(core.row + core.height) // f), -(-(core.col + core.width) // f)
            if r1 <= r0 or c1 <= c0:
                continue
            ids = src.read(1, window=core.to_rasterio())
            overview[r0:r1, c0:c1] = ids[r0 * f - core.row :: f, c0 * f - core.col :: f][: r1 - r0, : c1 - c0]
    save_palette_png(out, overview, label_space.flat_palette())
