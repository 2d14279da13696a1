"""Segmenter predictions of one raster or slide of any size, window by window, into a GeoTIFF.

The source is cut into core windows with a context margin (:func:`~wsss_domains.data.windows.plan_windows`, shared with
raster pseudo-labelling); each context is segmented by the sliding-window predictor and only its
core is written into a tiled palette GeoTIFF (:mod:`wsss_domains.data.label_raster`). Memory
depends on the window, not on the source. A killed run resumes from its progress record; a
finished output made from the same source, segmenter and options is not recomputed. The finished
file gets internal overviews (a pyramidal TIFF), so viewers open a slide-sized map at any zoom.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from torch import Tensor

from wsss_domains.data import label_raster
from wsss_domains.data.io import atomic_write
from wsss_domains.data.windows import TileWindow, plan_windows
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.progress import progress_bar
from wsss_domains.segmentation.inference import SegmenterPredictor

DEFAULT_WINDOW = 1024
DEFAULT_MARGIN = 128


class WindowSource(Protocol):
    """Pixels of a large image read window by window (a raster, one level of a slide)."""

    path: Path
    size: tuple[int, int]  # height, width

    def read(self, window: TileWindow) -> tuple[Tensor, Tensor | None]:
        """``3 x h x w`` in [0, 1] and the pixels known to hold no data (or None)."""

    def skip(self, window: TileWindow) -> bool:
        """True where a window need not be segmented (nothing to see: no tissue, all no-data)."""

    def identity(self) -> dict[str, Any]:
        """What the pixels depend on (path, file stamp, level, bands ...), for the fingerprint."""

    def georeferenced(self) -> Path | None:
        """The file whose georeferencing the output copies, or None."""


@dataclass
class WindowedOptions:
    window: int = DEFAULT_WINDOW
    margin: int = DEFAULT_MARGIN
    overview: Path | None = None  # a downsampled palette PNG of the result
    overview_size: int = label_raster.OVERVIEW_SIZE
    pyramid: bool = True  # internal overviews in the GeoTIFF
    compress: str = "deflate"
    resume: bool = True

    def check(self) -> None:
        if self.window < 16 or self.window % 16:
            raise UserError(f"--window must be a multiple of 16 (GeoTIFF blocks are), got {self.window}")
        if self.margin < 0:
            raise UserError(f"--margin must be >= 0, got {self.margin}")


@dataclass
class WindowedSummary:
    out: str
    source: str
    height: int
    width: int
    window: int
    margin: int
    windows: int
    skipped_windows: int = 0
    resumed_windows: int = 0
    already_done: bool = False
    seconds: float = 0.0
    overview: str | None = None
    fingerprint: str = ""
    crs: str | None = None
    extra: dict[str, Any] | None = None


def predict_windows(
    predictor: SegmenterPredictor,
    domain: DomainPlugin,
    label_space: LabelSpace,
    source: WindowSource,
    out: Path,
    options: WindowedOptions | None = None,
    *,
    segmenter_digest: str | None = None,
    extra: dict[str, Any] | None = None,
    after_write: Callable[[Path], None] | None = None,
) -> WindowedSummary:
    """Segment ``source`` window by window into the palette GeoTIFF ``out``; resumable."""
    started = time.monotonic()
    options = options or WindowedOptions()
    options.check()
    out = Path(out)
    height, width = source.size
    plan = plan_windows(height, width, options.window, options.margin)
    record = {
        "source": source.identity(),
        "segmenter": segmenter_digest or label_raster.digest(predictor.model),
        "inference": {k: v for k, v in asdict(predictor.options).items() if k not in ("device", "runtime")},
        "window": [options.window, options.margin],
    }
    fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    summary = WindowedSummary(
        out=str(out),
        source=str(source.path),
        height=height,
        width=width,
        window=options.window,
        margin=options.margin,
        windows=len(plan),
        fingerprint=fingerprint,
        extra=extra,
    )
    tmp, progress_path, summary_path = label_raster.sidecars(out)
    done_before = label_raster.finished_summary(out, summary_path, fingerprint)
    if done_before is not None:
        return WindowedSummary(**{**done_before, "already_done": True})
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=label_raster.GDAL_CACHE_MB):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        progress = label_raster.load_progress(progress_path, fingerprint) if options.resume else None
        labelfile, crs = label_raster.label_file(
            tmp,
            source.georeferenced(),
            (height, width),
            label_space,
            options.window,
            options.compress,
            {"source": str(source.path), "producer": "wsss-domains predict"},
        )
        done = set(progress.get("second") or []) if progress is not None else set()
        if not (done and labelfile.reopen()):
            done = set()
            labelfile.create()
        summary.resumed_windows = len(done)
        skipped = set(progress["state"].get("skipped", [])) if progress is not None else set()
        todo = set(range(len(plan))) - done
        bar = progress_bar(total=len(todo), desc="predict", unit="win")
        try:
            for row in label_raster.rows_of_windows(plan, todo):
                for i in row:
                    pair = plan[i]
                    if source.skip(pair.core):
                        ids = np.full((pair.core.height, pair.core.width), label_space.ignore_index, np.uint8)
                        skipped.add(i)
                    else:
                        raw, nodata = source.read(pair.context)
                        labels = predictor.labels(raw, domain, label_space, exclude=nodata)
                        rows, cols = pair.crop
                        ids = labels[rows, cols].numpy().astype(np.uint8)
                    labelfile.write(ids, pair.core)
                    done.add(i)
                    bar.update(1)
                labelfile.checkpoint()
                label_raster.save_progress(
                    progress_path, fingerprint, {"skipped": sorted(skipped)}, second=sorted(done)
                )
        finally:
            bar.close()
            labelfile.close()
        if options.pyramid:
            build_pyramid(tmp)
        if options.overview is not None:
            label_raster.write_overview(tmp, plan, Path(options.overview), label_space, options.overview_size)
            summary.overview = str(options.overview)
        if after_write is not None:
            after_write(tmp)
    summary.skipped_windows = len(skipped)
    summary.crs = crs
    summary.seconds = round(time.monotonic() - started, 2)
    text = json.dumps(asdict(summary), indent=2)
    os.replace(tmp, out)  # the output before its summary: a summary never vouches for an older file
    atomic_write(summary_path, lambda p: p.write_text(text))
    progress_path.unlink(missing_ok=True)
    return summary


def build_pyramid(path: Path, smallest: int = 128) -> None:
    """Internal overviews (halvings, nearest class id) down to ``smallest`` pixels a side."""
    with rasterio.open(path, "r+") as dst:
        factors, f = [], 2
        while max(dst.height, dst.width) / f >= smallest:
            factors.append(f)
            f *= 2
        if factors:
            dst.build_overviews(factors, Resampling.nearest)


class RasterSource:
    """A raster (GeoTIFF, anything rasterio reads) through the engine's windowed reader."""

    def __init__(self, path: Path, bands: tuple[int, ...] | None = None, scaling: str = "auto") -> None:
        from wsss_domains.data.raster_reader import ImageRaster

        self.image = ImageRaster(path, bands, scaling)  # type: ignore[arg-type]
        self.path = self.image.path
        self.size = self.image.info.size
        self.bands = bands
        self.scaling = scaling

    def read(self, window: TileWindow) -> tuple[Tensor, Tensor | None]:
        raw, nodata = self.image.read(window)
        return raw, None if nodata is None else torch.as_tensor(nodata)

    def skip(self, window: TileWindow) -> bool:
        nodata = self.image.nodata(window)
        return nodata is not None and bool(nodata.all())

    def identity(self) -> dict[str, Any]:
        return {
            "path": str(Path(self.path).resolve()),
            "stamp": list(self.image.info.stamp),
            "bands": self.bands,
            "scaling": self.scaling,
        }

    def georeferenced(self) -> Path | None:
        return Path(self.path)
