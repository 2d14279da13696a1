"""Images too large to hold whole: recognised from their header, staged for window-by-window work.

A loader decodes an image whole into a float32 ``3 x H x W`` tensor (12 bytes a pixel); CAMs add
``K`` maps of 4 bytes a pixel at every scale. A 12000² photo or scan would need tens of GB, so
images above :data:`LARGE_IMAGE_PIXELS` take the raster engine's path instead
(:mod:`wsss_domains.pseudo_labels.raster`): windows with context margins, per-class maxima over
the whole image in a first pass, labels written window by window. One windowing implementation
serves rasters and ordinary image files alike.

A dataset opts in by answering ``image_file(index)`` with an :class:`ImageFile` (path, labels,
mask path) without decoding pixels; the generic ``folder`` loader does. Loaders without it keep
the whole-image path.

PNG and JPEG decode only from their top, so reading a window near the bottom costs a decode of
everything above it; such images are first copied strip by strip, top to bottom, into a tiled
GeoTIFF (:func:`stage_image`), whose windows read directly. TIFFs are read in place.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.enums import ColorInterp
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import Subset

from wsss_domains.data.io import DataError
from wsss_domains.data.label_raster import GDAL_CACHE_MB
from wsss_domains.data.raster_reader import SEQUENTIAL_DRIVERS, open_raster, raster_info

# Above this many pixels an image is processed window by window (about 0.1-0.5 GB of CAM work at
# 2048², growing with the square of the side; below it the whole-image path is faster).
LARGE_IMAGE_PIXELS = 2048 * 2048
# Largest network input inside a window's context. Measured on a 1280² context at CAM scale 2 with
# flips, Lite0 in ONNX Runtime without its arena: tiles of 768 peak 0.57 GB above the process's
# start (6.4 s), of 1024 0.82 GB (7.0 s), of 512 0.50 GB (7.2 s).
WINDOW_TILE_SIZE = 768
# Hidden folder inside an output folder for staged copies and windowed outputs (removed when done).
SCRATCH_FOLDER = ".large"
# Rows of a staging strip: a 12000-pixel-wide RGB strip of 256 rows holds 9 MB.
STRIP_ROWS = 256


@dataclass(frozen=True)
class ImageFile:
    """Where a sample's pixels are and what labels it has, known without decoding the image."""

    id: str
    path: Path
    label: Tensor | None = None  # multi-hot foreground labels, where the dataset gives them
    mask: Path | None = None  # a class-id or colour mask whose classes can give them


def image_pixels(path: Path) -> int:
    """Pixel count from the file's header (nothing is decoded)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(path, f"unreadable image ({exc})") from exc
    return width * height


def image_file_of(dataset: object, index: int) -> ImageFile | None:
    """The sample's :class:`ImageFile`, or None where the dataset cannot name its files."""
    if isinstance(dataset, Subset):  # a fold or slice of a split
        return image_file_of(dataset.dataset, int(dataset.indices[index]))
    describe = getattr(dataset, "image_file", None)
    return None if describe is None else describe(index)


def large_image_file(dataset: object, index: int, max_pixels: int | None) -> ImageFile | None:
    """The sample's :class:`ImageFile` when it has more than ``max_pixels`` pixels, else None.

    None as well where the dataset cannot name its files (no ``image_file`` method, or it answers
    None for this sample) or ``max_pixels`` is None (windowing off).
    """
    if max_pixels is None:
        return None
    file = image_file_of(dataset, index)
    if file is None or image_pixels(file.path) <= max_pixels:
        return None
    return file


def stage_image(path: Path, folder: Path) -> Path:
    """A file whose windows read directly: ``path`` itself, or a tiled GeoTIFF copy in ``folder``.

    The copy is named after the source's size and modification time and kept until the caller
    deletes it, so a resumed job finds the same file (and the raster engine's fingerprint of it).
    """
    info = raster_info(path)
    if info.driver not in SEQUENTIAL_DRIVERS:
        return path
    staged = folder / f".{path.name}.{info.stamp[1]}-{info.stamp[0]}.stage.tif"
    if staged.is_file():
        return staged
    folder.mkdir(parents=True, exist_ok=True)
    part = staged.with_name(f"{staged.name}.pid{os.getpid()}.part")
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), open_raster(path) as src:
        profile = {
            "driver": "GTiff",
            "height": src.height,
            "width": src.width,
            "count": src.count,
            "dtype": src.dtypes[0],
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "BIGTIFF": "IF_SAFER",
        }
        palette = src.count == 1 and src.colorinterp[0] is ColorInterp.palette
        try:
            with rasterio.open(part, "w", **profile) as dst:
                if palette:
                    dst.write_colormap(1, src.colormap(1))
                for row in range(0, src.height, STRIP_ROWS):
                    window = Window(0, row, src.width, min(STRIP_ROWS, src.height - row))
                    dst.write(src.read(window=window), window=window)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, staged)
    return staged


def geotiff_to_png(tif: Path, png: Path) -> None:
    """A palette GeoTIFF copied line by line into a palette PNG (GDAL streams it; no sidecar file)."""
    import rasterio.shutil

    with rasterio.Env(GDAL_PAM_ENABLED="NO", GDAL_CACHEMAX=GDAL_CACHE_MB):
        rasterio.shutil.copy(tif, png, driver="PNG")


def remove_scratch(source: Path, staged: Path, labels_tif: Path) -> None:
    """The staged copy (never the source itself), the windowed output and its summary, then their
    folder if it is left empty."""
    for path in (labels_tif, labels_tif.with_name(f"{labels_tif.name}.json"), staged):
        if path != source:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        labels_tif.parent.rmdir()
