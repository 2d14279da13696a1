"""Windowed reading of image and mask rasters (GeoTIFF, PNG, JPEG) through rasterio.

Aerial and satellite scenes are often larger than memory allows, so nothing here reads a raster
whole unless asked for the whole window: a tile dataset over a 50k x 50k GeoTIFF holds one tile.
The one exception is PNG/JPEG, which GDAL can only decode from the top (a window near the bottom
costs a decode of the whole file): such files up to :data:`WHOLE_DECODE_PIXELS` are decoded once
into a small cache bounded by :data:`WHOLE_CACHE_BYTES`, and tiles are sliced from it; larger
ones are still read window by window (bounded memory, slow).

Image scaling to the ``[0, 1]`` range of the sample contract (``scaling`` option):

* ``"auto"`` (default): ``uint8`` is divided by 255; every other dtype (12/16-bit sensors, float
  reflectance) gets a per-band 2nd-98th percentile stretch.
* ``"percentile"``: the percentile stretch for every dtype.
* ``"dtype"``: integers divided by their dtype's maximum, floats clipped to ``[0, 1]``.

The percentiles are taken once per raster from a decimated read (at most :data:`STATS_SIZE`
pixels a side, no-data left out), so every tile of one raster is scaled the same way.

No-data: a pixel is no-data where GDAL masks every selected band (a nodata value, an alpha band,
an internal mask) or where every selected float band is NaN. Such pixels read as 0 and are
reported in a boolean array that loaders turn into ``exclude`` and the ignore label. "Every band"
rather than "any band" because a real pixel may legitimately hold the nodata value in one band.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
import torch
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NodataShadowWarning, NotGeoreferencedWarning, RasterioIOError
from rasterio.io import DatasetReader
from torch import Tensor

from wsss_domains.data.io import DataError
from wsss_domains.data.mask_codes import MaskCode, UnknownCode
from wsss_domains.data.windows import TileWindow

Scaling = Literal["auto", "percentile", "dtype"]
SCALINGS: tuple[str, ...] = ("auto", "percentile", "dtype")
# Longest side of the decimated read that percentile statistics are taken from.
STATS_SIZE = 1024
PERCENTILES = (2.0, 98.0)
# GDAL drivers that decode a file only from its top: no random access to a window.
SEQUENTIAL_DRIVERS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP"})
# Such files up to this many pixels are decoded whole once (a DeepGlobe 2448^2 scene is 6 M).
WHOLE_DECODE_PIXELS = 4096 * 4096
WHOLE_CACHE_BYTES = 256 * 2**20


@contextmanager
def open_raster(path: Path | str) -> Iterator[DatasetReader]:
    """A rasterio dataset; a :class:`DataError` naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    with warnings.catch_warnings():
        # Plain PNG/JPEG files carry no georeference; that is normal here.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        # A nodata value on a 4-band raster (RGBIR) takes precedence over GDAL's alpha guess: wanted.
        warnings.simplefilter("ignore", NodataShadowWarning)
        try:
            src = rasterio.open(path)
        except RasterioIOError as exc:
            raise DataError(path, f"unreadable raster ({exc})") from exc
        with src:
            try:
                yield src
            except RasterioIOError as exc:
                raise DataError(path, f"unreadable raster ({exc})") from exc


@dataclass(frozen=True)
class RasterInfo:
    """What the header of a raster says; reading it costs no pixel I/O."""

    path: Path
    height: int
    width: int
    count: int
    dtype: str
    driver: str
    # Some band is masked by a nodata value, an alpha band or an internal mask.
    has_nodata: bool
    # The colour table of a single band of palette indices (palette PNG masks), else None.
    colormap: tuple[tuple[int, int, int], ...] | None
    # (modification time, size): tells a rewritten file from the one whose decode is cached.
    stamp: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def palette(self) -> bool:
        return self.colormap is not None

    @property
    def decode_whole(self) -> bool:
        """Read once and cache: a top-down-only format small enough to hold (see ``_WholeCache``)."""
        return self.driver in SEQUENTIAL_DRIVERS and self.height * self.width <= WHOLE_DECODE_PIXELS


def raster_info(path: Path | str) -> RasterInfo:
    with open_raster(path) as src:
        flags = src.mask_flag_enums
        has_nodata = any(MaskFlags.all_valid not in band for band in flags)
        colormap = None
        if src.count == 1 and src.colorinterp[0] is ColorInterp.palette:
            table = src.colormap(1)
            colormap = tuple(tuple(table.get(i, (0, 0, 0))[:3]) for i in range(max(256, max(table) + 1)))
        stat = Path(path).stat()
        return RasterInfo(
            Path(path),
            src.height,
            src.width,
            src.count,
            src.dtypes[0],
            src.driver,
            has_nodata,
            colormap,  # type: ignore[arg-type]
            (stat.st_mtime_ns, stat.st_size),
        )


def _full(info: RasterInfo) -> TileWindow:
    return TileWindow(0, 0, info.height, info.width)


def _check_window(info: RasterInfo, window: TileWindow) -> None:
    if window.row < 0 or window.col < 0 or window.height < 1 or window.width < 1:
        raise ValueError(f"invalid window {tuple(window)}")
    if window.row + window.height > info.height or window.col + window.width > info.width:
        raise ValueError(f"window {tuple(window)} extends past the {info.height}x{info.width} raster")


def _palette_lut(info: RasterInfo) -> np.ndarray:
    """The colour table as an ``N x 3`` uint8 lookup (unlisted entries black)."""
    return np.array(info.colormap, dtype=np.uint8)


class _WholeCache:
    """The last few whole decodes of sequential-format rasters, bounded in bytes (per process)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[object, ...], np.ndarray] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> np.ndarray | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: tuple[object, ...], value: np.ndarray) -> None:
        self._items[key] = value
        while len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


_WHOLE = _WholeCache(WHOLE_CACHE_BYTES)


def read_pixels(
    info: RasterInfo, indexes: Sequence[int], window: TileWindow, masks: bool = False
) -> np.ndarray:
    """Band values (or GDAL validity masks, 0 = no-data) of a window, ``bands x h x w``.

    GeoTIFFs (and every format with random access) are read from disk window by window.
    PNG/JPEG can only be decoded from the top, so a window read costs a decode of everything
    above it; those files, when at most :data:`WHOLE_DECODE_PIXELS`, are decoded once into a
    small byte-bounded cache and windows are sliced from it. Larger ones are still read by window.
    """
    indexes = [int(i) for i in indexes]
    if not info.decode_whole:
        with open_raster(info.path) as src:
            if masks:
                return src.read_masks(indexes, window=window.to_rasterio())
            return src.read(indexes, window=window.to_rasterio())
    key = (str(info.path), info.stamp, masks, tuple(indexes))
    whole = _WHOLE.get(key)
    if whole is None:
        with open_raster(info.path) as src:
            whole = src.read_masks(indexes) if masks else src.read(indexes)
        _WHOLE.put(key, whole)
    return whole[:, window.row : window.row + window.height, window.col : window.col + window.width]


def resolve_bands(info: RasterInfo, bands: Sequence[int] | None) -> tuple[int, int, int]:
    """The three 1-based bands that become R, G, B (one band is repeated as grey)."""
    if bands is None:
        if info.count >= 3:
            return (1, 2, 3)
        if info.count == 1:
            return (1, 1, 1)
        raise DataError(info.path, f"has {info.count} bands; pass bands=(r, g, b) to choose three")
    chosen = tuple(int(b) for b in bands)
    if len(chosen) == 1:
        chosen = chosen * 3
    if len(chosen) != 3:
        raise ValueError(f"bands must name 1 or 3 bands (1-based), got {tuple(bands)}")
    for band in chosen:
        if not 1 <= band <= info.count:
            raise DataError(info.path, f"has {info.count} bands; bands={tuple(bands)} asks for band {band}")
    return chosen  # type: ignore[return-value]


class ImageRaster:
    """One image raster read window by window as float ``3 x h x w`` in ``[0, 1]``."""

    def __init__(
        self, path: Path | str, bands: Sequence[int] | None = None, scaling: Scaling = "auto"
    ) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        self.info = raster_info(path)
        self.path = self.info.path
        self.scaling = scaling
        # A palette image is expanded through its colour table unless bands are chosen explicitly.
        self._expand_palette = self.info.palette and bands is None
        self.bands = resolve_bands(self.info, bands)
        self._stretch: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def _unique_bands(self) -> list[int]:
        return sorted(set(self.bands))

    def _method(self) -> str:
        if self._expand_palette:
            return "uint8"
        if self.scaling == "auto":
            return "uint8" if self.info.dtype == "uint8" else "percentile"
        if self.scaling == "dtype" and self.info.dtype == "uint8":
            return "uint8"
        return self.scaling

    def stretch(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-band (low, high) percentiles of the selected bands, from a decimated read."""
        if self._stretch is None:
            info = self.info
            factor = max(1.0, max(info.height, info.width) / STATS_SIZE)
            shape = (max(1, round(info.height / factor)), max(1, round(info.width / factor)))
            bands = list(self.bands)
            with open_raster(self.path) as src:
                data = src.read(
                    bands, out_shape=(len(bands), *shape), masked=True, resampling=Resampling.nearest
                )
            lows, highs = [], []
            for band in data:
                values = band.compressed().astype(np.float64)
                values = values[np.isfinite(values)]
                if values.size == 0:
                    lows.append(0.0)
                    highs.append(1.0)
                    continue
                lo, hi = np.percentile(values, PERCENTILES)
                lows.append(float(lo))
                highs.append(float(hi) if hi > lo else float(lo) + 1.0)
            self._stretch = (np.array(lows)[:, None, None], np.array(highs)[:, None, None])
        return self._stretch

    def _scale(self, raw: np.ndarray) -> np.ndarray:
        method = self._method()
        if method == "uint8":
            return raw.astype(np.float32) / 255.0
        if method == "dtype":
            if np.issubdtype(raw.dtype, np.integer):
                return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
            return np.clip(np.nan_to_num(raw.astype(np.float32)), 0.0, 1.0)
        lo, hi = self.stretch()
        return np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    def nodata(self, window: TileWindow | None = None) -> np.ndarray | None:
        """Boolean ``h x w`` no-data pixels of a window, or None when the raster has none."""
        window = window or _full(self.info)
        _check_window(self.info, window)
        if not self.info.has_nodata or self._expand_palette:
            return None
        masks = read_pixels(self.info, self._unique_bands, window, masks=True)
        return (masks == 0).all(axis=0)

    def read(self, window: TileWindow | None = None) -> tuple[Tensor, Tensor | None]:
        """Image ``3 x h x w`` float32 in [0, 1] and the no-data ``h x w`` bool (or None)."""
        window = window or _full(self.info)
        _check_window(self.info, window)
        if self._expand_palette:
            index = read_pixels(self.info, [1], window)[0]
            raw = np.moveaxis(_palette_lut(self.info)[index], -1, 0)
        else:
            raw = read_pixels(self.info, self.bands, window)
        nodata = self.nodata(window)
        if np.issubdtype(raw.dtype, np.floating):
            nan = np.isnan(raw).all(axis=0)
            if nan.any():
                nodata = nan if nodata is None else nodata | nan
        image = self._scale(raw)
        if nodata is not None:
            image[:, nodata] = 0.0
        return torch.from_numpy(np.ascontiguousarray(image)), (
            None if nodata is None else torch.from_numpy(nodata)
        )


class MaskRaster:
    """One mask raster (ids, palette indices or RGB colours) decoded to class ids window by window."""

    def __init__(self, path: Path | str, code: MaskCode) -> None:
        self.info = raster_info(path)
        self.path = self.info.path
        self.code = code
        if code.wants_rgb and self.info.count < 3 and not self.info.palette:
            raise DataError(
                self.path, f"expected an RGB or palette colour mask, found {self.info.count} band(s)"
            )
        if not code.wants_rgb and self.info.count >= 3:
            raise DataError(self.path, f"expected a single-channel id mask, found {self.info.count} bands")

    def read(self, window: TileWindow | None = None) -> Tensor:
        """Class ids ``h x w`` int64, ``IGNORE_INDEX`` where unscored; DataError on unknown codes."""
        window = window or _full(self.info)
        _check_window(self.info, window)
        if self.info.count >= 3:
            values = np.moveaxis(read_pixels(self.info, (1, 2, 3), window), 0, -1)
        else:
            values = read_pixels(self.info, [1], window)[0]
            if self.code.wants_rgb:
                values = _palette_lut(self.info)[values]
        invalid = None
        if self.info.has_nodata:
            invalid = read_pixels(self.info, [1], window, masks=True)[0] == 0
        try:
            ids = self.code.decode(values, invalid)
        except UnknownCode as exc:
            y, x = exc.position
            raise DataError(
                self.path,
                f"{exc.what} {exc.value} at (row {window.row + y}, col {window.col + x}) "
                f"is not a known class {exc.what}",
            ) from None
        return torch.from_numpy(ids)
