"""Pseudo-labelling one raster larger than memory, window by window, into a palette GeoTIFF.

The in-memory path (:mod:`writer`) holds an image and its ``K x H x W`` CAMs whole; a city-sized
GeoTIFF does not fit. Here the raster is cut into *core* windows of ``window`` pixels, a grid from
the top-left corner whose steps are multiples of the output's GeoTIFF blocks, so every block is
written once and whole. Each core is labelled from the CAMs of its *context*: the core grown by
``margin`` pixels a side (at a raster edge the context is shifted inward rather than cut, so every
context has the same size and the network always sees real surroundings). Only the core is
written, so a pixel next to a seam is labelled from maps that saw ``margin`` pixels of its
neighbourhood, not the zero padding of a window border.

Per-class maxima (``max_over``, ``--cam-max-over``). The in-memory path divides each class map by
its maximum over the whole image. Over a raster seen window by window that maximum is known only
once every window was seen, hence two modes:

* ``"raster"`` (default): a first pass computes the same maps on the same windows and keeps only
  the per-class maxima over the cores (K numbers); the second pass divides the same maps by
  them, read back from disk where they fit (:class:`MapCache`, ``map_cache_gb``), else recomputed. Every window has the same divisor, so normalisation adds no jump at a seam: labels
  change across a seam only where the raw maps of the two contexts differ (see Margin). Wherever
  the raw maps do not depend on the windowing, the result equals the whole-image pseudo-label
  computed in memory (the tests check this exactly on a pixel-wise model). Cost: the CAMs once
  and ``K x context`` float32 values a window written to disk and read back (CAMs twice where the
  disk budget is too small).
* ``"window"``: each window's maps are divided by their own maximum over its context; one pass.
  The divisor then jumps at every seam: a class barely present in one window is stretched to 1
  there and wins pixels it loses in the next window (with a threshold background, foreground
  appears in windows that hold none).

``"raster"`` is the default because it is the whole-image rule and puts no normalisation seam into
the map. Measured: with a tiny CNN it agrees with the whole-image labels on 98 % of the pixels
against 90 % per window (tests), and across the window seams of the benchmark's 4096² raster its
labels change at 41.0 % of pixel pairs against 44.9 % per window (random head; see Margin for
why both are high). ``"window"`` writes no maps to disk. Both concern the classic max normalisation; with
``cam_norm="sigmoid"`` (a sigmoid of the averaged pixel logits) nothing depends on other windows
and one pass suffices in either mode.

Margin. A CNN's maps near a context border are not those it computes amid the real surroundings
(zero padding; EfficientNet-Lite0's receptive field spans hundreds of pixels), so two windows can
disagree about the pixels along their common seam; the margin keeps those borders away from the
seam, in the network's pixels, so a CAM scale of 0.5 halves it. ``benchmarks/raster_windowed.py``
measures the share of neighbouring pixel pairs whose labels differ across seams against that across
lines through window middles (0.6-0.8 %): at CAM scale 0.5 with Lite0 and a random head (nearly
tied class maps, the worst case) 48.9 % at margin 64, 41.0 % at 128, 21.1 % at 256; seams stay
visible until the margin covers the network's effective receptive field. The default, 128, costs
``(1 + 256 / 1024)² = 1.56x`` the pixels of a bare 1024 window (256: 2.25x); widen it where seams
matter more than time, above all at CAM scales below 1.

Memory. At any time one context is alive: its pixels, the network's activations over it, its K
maps. The raster, its CAMs and its label map are never held whole, and GDAL's block cache (which
counts in the resident memory, by default 5 % of RAM) is capped at :data:`GDAL_CACHE_MB`. Peak
memory thus grows with ``window + 2 margin``, the CAM scales and flip, not with the raster size.
Measured (benchmark, Lite0, one CAM scale, no flip, whole ``pseudo-labels`` process whose imports
alone take 1.0 GB): 1.28 GB for a 4096² and 1.25 GB for a 16384² raster at CAM scale 0.5; at scale
1, 1.78 GB with the default window and margin, 1.30 GB with ``window=512``.

Image-level labels, once for the whole raster by default: given by name, or the classes present in
a mask raster (read window by window, no-data left out; ``label_fraction``: a class must cover that
share of the scored pixels, e.g. when the mask is a segmenter's prediction), or, when neither is given, predicted by
the classifier on every core and united (at least its top class per window); the summary says
which (``label_source``). With ``labels_per_window`` each window takes its own labels from its mask
window or its own prediction instead (the tile-level protocol of remote-sensing WSSS).

Writing is atomic: the GeoTIFF grows in a temporary file beside the output, renamed at the end.
Finished windows (and the first pass's results) are recorded in a sidecar JSON at every row of
windows, so a killed run resumes where it stopped; a finished output whose summary (``OUT.tif.json``
beside it) records the same inputs is not recomputed.

Pixels are read through the engine's windowed readers in :mod:`wsss_domains.data.raster_reader`
(``ImageRaster``, ``MaskRaster``: band choice, scaling of 12/16-bit data, the no-data rule), the same
ones the remote-sensing loaders use; no-data pixels get the ignore index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.cam.settings import CamSettings
from wsss_domains.data.io import DataError, atomic_write
from wsss_domains.data.label_raster import (
    GDAL_CACHE_MB,
    OVERVIEW_SIZE,
    LabelFile,
    digest,
    finished_summary,
    label_file,
    load_progress,
    rows_of_windows,
    save_progress,
    sidecars,
    write_overview,
)
from wsss_domains.data.mask_codes import ColorCode, IdCode, MaskCode
from wsss_domains.data.raster_reader import ImageRaster, MaskRaster, RasterInfo, Scaling, raster_info
from wsss_domains.data.windows import TileWindow, WindowPair, plan_windows
from wsss_domains.domains.contract import BackgroundMode, DomainPlugin, LabelSpace
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.progress import progress_bar
from wsss_domains.pseudo_labels.assemble import cams_to_labels, labels_from_logits
from wsss_domains.settings import setting
from wsss_domains.training.data import normalize
from wsss_domains.training.run import RunConfig, run_label_space

MaxOver = Literal["raster", "window"]
MAX_OVER: tuple[str, ...] = ("raster", "window")
DEFAULT_WINDOW = 1024
# Context a side; seams measured in benchmarks/results/raster_windowed.md (see "Margin" above).
DEFAULT_MARGIN = 128
EPS = 1e-5


@dataclass
class RasterOptions(CamSettings):
    """How a raster is cut, read, normalised and written (see the module docstring), besides the CAM
    settings it extends."""

    window: int = setting(
        DEFAULT_WINDOW, help=f"side of the windows written, a multiple of 16 (default {DEFAULT_WINDOW})"
    )
    margin: int = setting(
        DEFAULT_MARGIN, help=f"context pixels read around each window (default {DEFAULT_MARGIN})"
    )
    bands: tuple[int, ...] | None = None
    scaling: Scaling = setting(
        "auto", help="pixel scaling (default auto: uint8 / 255, other types a 2-98 percentile stretch)"
    )
    max_over: MaxOver = setting(
        "raster",
        help="each class map is divided by its maximum over the whole raster (raster: two passes, labels "
        "consistent across window seams; the default) or over each window (window: one pass)",
    )
    labels_per_window: bool = setting(
        False, help="each window takes its own labels, from its mask window or its own prediction"
    )
    # Labels from a mask raster: the share of the scored pixels (the raster's, or a window's with
    # labels_per_window) a class needs, so that a few stray pixels of a predicted mask name no class.
    label_fraction: float = 0.0
    # Disk the first pass may fill with raw maps so the second need not recompute them (see MapCache).
    map_cache_gb: float = 8.0
    overview: Path | None = setting(None, help="also write a downsampled palette PNG", metavar="PNG")
    overview_size: int = OVERVIEW_SIZE
    compress: str = "deflate"
    resume: bool = setting(True, help="start afresh, do not resume")
    device: str = "cpu"

    def check(self) -> None:
        if self.window < 16 or self.window % 16:
            raise ValueError(f"window must be a multiple of 16 (GeoTIFF blocks are), got {self.window}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.max_over not in MAX_OVER:
            raise ValueError(f"max_over must be one of {', '.join(MAX_OVER)}, got {self.max_over!r}")
        if self.map_cache_gb < 0:
            raise ValueError(f"map_cache_gb must be >= 0, got {self.map_cache_gb}")
        if self.overview_size < 1:
            raise ValueError(f"overview_size must be positive, got {self.overview_size}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must lie in [0, 1], got {self.label_fraction}")


@dataclass
class RasterSummary:
    """What was written and how; saved as JSON beside the output."""

    out: str
    raster: str
    height: int
    width: int
    window: int
    margin: int
    windows: int
    max_over: str
    label_source: str  # given | mask | predicted
    labels: list[str]  # the raster's labels (per-window labels: their union)
    labels_per_window: bool
    bg_threshold: float | None
    scales: list[float]
    flip: bool
    cam_norm: str
    class_maxima: dict[str, float] | None = None
    overview: str | None = None
    resumed_windows: int = 0
    already_done: bool = False
    seconds: float = 0.0
    fingerprint: str = ""
    mask: str | None = None
    crs: str | None = None


def labels_from_names(names: Sequence[str], label_space: LabelSpace) -> Tensor:
    """Multi-hot foreground vector of class names; a ValueError naming the classes otherwise."""
    names = [n.strip() for n in names if n.strip()]
    known = label_space.foreground_names
    if not names:
        raise ValueError(f"no label names given; the run's classes are {', '.join(known)}")
    for name in names:
        if name not in known:
            why = (
                " (the background class is decided by the domain's background rule, not given as a label)"
                if label_space.background_index is not None
                and name == label_space.classes[label_space.background_index]
                else ""
            )
            raise ValueError(
                f"label '{name}' is not a class of the run's label space{why}; known: {', '.join(known)}"
            )
    return torch.tensor([float(n in names) for n in known])


def mask_code(info: RasterInfo, label_space: LabelSpace) -> MaskCode:
    """How a mask raster stores classes: class ids in one band, or the label space's colours in RGB.

    One band (ids or palette indices) holds class ids as pseudo-labels and engine masks do; three
    bands hold the label space's palette colours, its ignore colour meaning ignore.
    """
    if info.count >= 3:
        colors = {tuple(rgb): i for i, rgb in enumerate(label_space.palette)}
        colors.setdefault(tuple(label_space.ignore_color), label_space.ignore_index)
        return ColorCode(colors)  # type: ignore[arg-type]
    return IdCode.identity(label_space.num_classes, label_space.ignore_index)


class MapCache:
    """The first pass's raw context maps on disk, so that the second pass reads them back.

    Maxima over the raster need every window's maps twice: for the per-class maxima, then for the
    labels. Kept as float32 ``.npy`` files (``K x context`` pixels each, 4 bytes a value) they are
    read back bit for bit, which halves the time; a window's file is deleted once its labels are
    written. The folder is named after the job's fingerprint, so a resumed job reuses only maps of
    the same inputs.
    """

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.folder = out.with_name(f".{out.name}.maps-{fingerprint[:16]}")
        for other in out.parent.glob(f".{out.name}.maps-*"):
            if other != self.folder:
                shutil.rmtree(other, ignore_errors=True)

    @staticmethod
    def fits(plan: Sequence[WindowPair], k: int, out: Path, budget_gb: float) -> bool:
        """Whether every window's maps fit within ``budget_gb`` and half the free disk."""
        context = plan[0].context
        need = len(plan) * k * context.height * context.width * 4
        free = shutil.disk_usage(out.parent).free
        return need <= budget_gb * 1e9 and 2 * need <= free

    def _path(self, index: int) -> Path:
        return self.folder / f"{index}.npy"

    def save(self, index: int, maps: Tensor) -> None:
        self.folder.mkdir(exist_ok=True)
        array = maps.float().cpu().numpy()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, array)

        atomic_write(self._path(index), write)

    def load(self, index: int) -> Tensor | None:
        path = self._path(index)
        return torch.from_numpy(np.load(path)) if path.is_file() else None

    def drop(self, indices: Sequence[int]) -> None:
        for index in indices:
            self._path(index).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Job:
    """One raster, one run: reads a window, computes its maps, labels its core."""

    def __init__(
        self,
        config: RunConfig,
        extractor: CamExtractor,
        method: Method,
        domain: DomainPlugin,
        label_space: LabelSpace,
        image: ImageRaster,
        mask: MaskRaster | None,
        options: RasterOptions,
        bg_threshold: float | None,
    ) -> None:
        self.config = config
        self.extractor = extractor
        self.method = method
        self.domain = domain
        self.label_space = label_space
        self.image = image
        self.mask = mask
        self.options = options
        self.bg = bg_threshold
        self.k = len(label_space.foreground)
        self.cache: MapCache | None = None

    def read(self, window: TileWindow) -> tuple[Tensor, Tensor, Tensor | None]:
        """Raw ``3 x h x w`` in [0, 1], normalised network input, no-data (or None)."""
        raw, nodata = self.image.read(window)
        x = normalize(self.domain.preprocess(raw), self.config.mean, self.config.std)
        return raw, x.to(self.options.device), nodata

    def raw_maps(self, x: Tensor, pair: WindowPair | None = None) -> Tensor:
        maps = self.extractor.maps(x)
        if maps.shape[0] != self.k:
            raise ValueError(
                f"the model gives {maps.shape[0]} class maps, the run's label space has {self.k} "
                f"foreground classes ({', '.join(self.label_space.foreground_names)})"
            )
        return maps if pair is None else maps[:, pair.crop[0], pair.crop[1]]

    @torch.no_grad()
    def predict(self, x: Tensor, pair: WindowPair) -> Tensor:
        """Multi-hot labels the classifier predicts for a core, at the run's magnification."""
        core = x[:, pair.crop[0], pair.crop[1]]
        scale = self.config.base_scale
        if scale != 1.0:
            size = (max(1, round(core.shape[1] * scale)), max(1, round(core.shape[2] * scale)))
            core = F.interpolate(core[None], size=size, mode="bilinear", align_corners=False)[0]
        logits = self.extractor.model(core[None])["logits"][0]
        return labels_from_logits(logits).cpu()

    def mask_counts(self, core: TileWindow) -> np.ndarray:
        """Pixels of each class in a core of the mask raster, the image's no-data left out."""
        assert self.mask is not None
        ids = self.mask.read(core).numpy()
        scored = ids != self.label_space.ignore_index
        nodata = self.image.nodata(core)
        if nodata is not None:
            scored &= ~nodata
        return np.bincount(ids[scored].ravel(), minlength=self.label_space.num_classes)

    def present_from_counts(self, counts: np.ndarray) -> Tensor:
        """Classes covering ``label_fraction`` of the counted (scored) pixels, at least one pixel."""
        need = max(1, math.ceil(self.options.label_fraction * int(counts.sum())))
        return torch.from_numpy((counts[list(self.label_space.foreground)] >= need).astype(np.float32))

    def labels(
        self, pair: WindowPair, present: Tensor | None, maxima: Tensor | None, maps: Tensor | None = None
    ) -> tuple[np.ndarray, Tensor]:
        """Class ids of a core (uint8) and the labels used for it; ``maps``: its raw maps, if known."""
        raw, x, nodata = self.read(pair.context)
        if maxima is None:  # the extractor's own normalisation, over this context
            cams = self.extractor(x)
        else:
            maps = self.raw_maps(x) if maps is None else maps.to(x.device)
            cams = maps / maxima.to(x.device).clamp_min(EPS)[:, None, None]
            # Only the margin can pass 1: its maps came from another context than its own core's.
            cams = cams.clamp_max(1.0)
        if present is None:
            if self.mask is not None:
                present = self.present_from_counts(self.mask_counts(pair.core))
            else:
                present = self.predict(x, pair)
        present = present.to(cams.device)
        exclude = nodata if nodata is not None else self.domain.exclude_mask(raw, self.label_space)
        context = RefineContext(
            raw.to(cams.device), present, self.domain, self.label_space, self.bg, exclude, None, x
        )
        cams = self.method.refine(cams, context)
        ids = cams_to_labels(cams, present, self.label_space, self.bg, exclude)
        ids = self.method.refine_labels(ids, cams, context)
        rows, cols = pair.crop
        return ids[rows, cols].cpu().numpy().astype(np.uint8), present.cpu()


def pseudo_label_raster(
    config: RunConfig,
    model: nn.Module,
    method: Method,
    raster: Path | str,
    out: Path | str,
    *,
    modules: nn.ModuleDict | None = None,
    labels: Sequence[str] | Tensor | None = None,
    mask: Path | str | None = None,
    options: RasterOptions | None = None,
    extractor: CamExtractor | None = None,
) -> RasterSummary:
    """Pseudo-label ``raster`` with a trained run into a single-band uint8 palette GeoTIFF ``out``.

    ``labels``: the raster's class names (or their multi-hot vector); else ``mask``, a mask raster
    of the same size; else the classifier's predictions (see the module docstring). No-data pixels
    get the ignore index. ``extractor``: a CAM extractor already built (and perhaps running in ONNX
    Runtime); its scales, flip and normalisation replace those of ``options``.
    """
    started = time.monotonic()
    options = options or RasterOptions()
    if extractor is not None:
        options.scales, options.flip = extractor.scales, extractor.flip
        options.cam_norm = extractor.normalization
    options.check()
    out = Path(out)
    if labels is not None and mask is not None:
        raise ValueError("give the raster's labels or a mask raster to derive them from, not both")
    if labels is not None and options.labels_per_window:
        raise ValueError("labels_per_window needs a mask raster or predicted labels, not given labels")
    if options.label_fraction and mask is None:
        raise ValueError("label_fraction applies to labels read off a mask raster (mask=...)")
    domain, label_space = run_label_space(config)
    with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        image = ImageRaster(raster, options.bands, options.scaling)
        mask_raster = None
        if mask is not None:
            mask_raster = MaskRaster(mask, mask_code(raster_info(mask), label_space))
            if mask_raster.info.size != image.info.size:
                raise DataError(
                    mask, f"mask size {mask_raster.info.size} does not match raster size {image.info.size}"
                )
        given = (
            labels.float().cpu()
            if isinstance(labels, Tensor)
            else None
            if labels is None
            else labels_from_names(labels, label_space)
        )
        if given is not None and given.numel() != len(label_space.foreground):
            raise ValueError(
                f"{given.numel()} labels given, the run has {len(label_space.foreground)} classes "
                f"({', '.join(label_space.foreground_names)})"
            )
        bg = options.bg_threshold
        if label_space.background_mode is BackgroundMode.THRESHOLD and bg is None:
            bg = domain.background_threshold(label_space)
        plan = plan_windows(*image.info.size, options.window, options.margin)
        span = max(plan[0].context.height, plan[0].context.width)
        if extractor is None:
            extractor = method.extractor(
                model,
                modules if modules is not None else nn.ModuleDict(),
                scales=options.scales,
                flip=options.flip,
                base_scale=config.base_scale,
                normalization=options.cam_norm,
                tile_size=max(span, 1024),  # no tiling inside a context at scale 1
            )
        method.setup(domain, config.mean, config.std)
        job = _Job(config, extractor, method, domain, label_space, image, mask_raster, options, bg)
        summary = RasterSummary(
            out=str(out),
            raster=str(image.path),
            height=image.info.height,
            width=image.info.width,
            window=options.window,
            margin=options.margin,
            windows=len(plan),
            max_over=options.max_over,
            label_source="given" if given is not None else "mask" if mask_raster is not None else "predicted",
            labels=[],
            labels_per_window=options.labels_per_window,
            bg_threshold=bg,
            scales=list(options.scales),
            flip=options.flip,
            cam_norm=options.cam_norm,
            fingerprint=_fingerprint(config, model, modules, method, image, mask_raster, given, options),
            mask=None if mask_raster is None else str(mask_raster.path),
        )
        tmp, progress_path, summary_path = sidecars(out)
        finished = _finished(out, summary_path, summary.fingerprint)
        if finished is not None:
            if options.overview is not None:
                write_overview(out, plan, Path(options.overview), label_space, options.overview_size)
                finished.overview = str(options.overview)
            return finished
        out.parent.mkdir(parents=True, exist_ok=True)
        progress = load_progress(progress_path, summary.fingerprint) if options.resume else None
        if options.max_over == "raster" and options.cam_norm == "max":
            job.cache = MapCache(out, summary.fingerprint)
            if not options.resume:
                job.cache.remove()
            if not MapCache.fits(plan, job.k, out, options.map_cache_gb):
                job.cache.remove()
                job.cache = None
        state = _first_pass(job, plan, given, progress_path, summary.fingerprint, progress)
        labelfile, crs = label_file(
            tmp,
            image.path,
            image.info.size,
            label_space,
            options.window,
            options.compress,
            {"max_over": options.max_over, "label_source": summary.label_source},
        )
        resumed = progress.get("second") if progress is not None else None
        done = set(resumed or [])
        if not (done and labelfile.reopen()):
            done = set()
            labelfile.create()
        summary.resumed_windows = len(done)
        union = _second_pass(job, plan, state, labelfile, done, progress_path, summary.fingerprint)
        names = label_space.foreground_names
        summary.labels = [n for n, v in zip(names, union.tolist(), strict=True) if v]
        if state["maxima"] is not None:
            summary.class_maxima = dict(zip(names, state["maxima"], strict=True))
        summary.crs = crs
        if options.overview is not None:
            write_overview(tmp, plan, Path(options.overview), label_space, options.overview_size)
            summary.overview = str(options.overview)
        summary.seconds = round(time.monotonic() - started, 2)
        text = json.dumps(asdict(summary), indent=2)
        # The output before its summary: a summary never vouches for an older output.
        os.replace(tmp, out)
        atomic_write(summary_path, lambda p: p.write_text(text))
        progress_path.unlink(missing_ok=True)
        if job.cache is not None:
            job.cache.remove()
        return summary


def _second_pass(
    job: _Job,
    plan: Sequence[WindowPair],
    state: dict[str, Any],
    labelfile: LabelFile,
    done: set[int],
    progress_path: Path,
    fingerprint: str,
) -> Tensor:
    """Label and write every window not yet done; returns the union of the labels used."""
    maxima = None if state["maxima"] is None else torch.tensor(state["maxima"])
    present = None if state["present"] is None else torch.tensor(state["present"])
    union = torch.tensor(state.get("union") or [0.0] * job.k)
    todo = set(range(len(plan))) - done
    bar = progress_bar(total=len(todo), desc="pseudo-labels", unit="win")
    try:
        for row in rows_of_windows(plan, todo):
            for i in row:
                maps = job.cache.load(i) if job.cache is not None and maxima is not None else None
                ids, used = job.labels(plan[i], present, maxima, maps)
                labelfile.write(ids, plan[i].core)
                union = torch.maximum(union, used)
                done.add(i)
                bar.update(1)
            labelfile.checkpoint()
            state["union"] = union.tolist()
            save_progress(progress_path, fingerprint, state, second=sorted(done))
            if job.cache is not None:
                job.cache.drop(row)
    finally:
        bar.close()
        labelfile.close()
    return union


def _fingerprint(
    config: RunConfig,
    model: nn.Module,
    modules: nn.ModuleDict | None,
    method: Method,
    image: ImageRaster,
    mask: MaskRaster | None,
    given: Tensor | None,
    options: RasterOptions,
) -> str:
    """What the output depends on: inputs (by path and stamp), run, weights, method and options."""
    record = {
        "raster": [str(image.path.resolve()), list(image.info.stamp)],
        "mask": None if mask is None else [str(mask.path.resolve()), list(mask.info.stamp)],
        "labels": None if given is None else given.tolist(),
        "config": asdict(config),
        "weights": digest(model, *([modules] if modules is not None else [])),
        "method": [type(method).__name__, method.options],
        # What cannot change the labels stays out: a finished output serves any of these.
        "options": {
            k: v
            for k, v in asdict(options).items()
            if k not in ("resume", "device", "overview", "overview_size")
        },
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _first_pass(
    job: _Job,
    plan: Sequence[WindowPair],
    given: Tensor | None,
    progress_path: Path,
    fingerprint: str,
    progress: dict[str, Any] | None,
) -> dict[str, Any]:
    """Per-class maxima over the raster and the raster's labels where they are derived.

    Returns the state the second pass needs: ``maxima`` (K floats, or None for per-window
    normalisation) and ``present`` (the raster's K-vector, or None for per-window labels).
    """
    if progress is not None and progress.get("second") is not None:
        return progress["state"]
    options = job.options
    # Only max normalisation depends on the whole raster; a sigmoid of the logits is per pixel.
    need_maxima = options.max_over == "raster" and options.cam_norm == "max"
    derive = given is None and not options.labels_per_window
    need_counts = derive and job.mask is not None
    need_predictions = derive and job.mask is None
    state: dict[str, Any] = {
        "maxima": [0.0] * job.k if need_maxima else None,
        "counts": [0] * job.label_space.num_classes if need_counts else None,
        "predicted": [0.0] * job.k if need_predictions else None,
    }
    done: set[int] = set()
    if progress is not None:
        state, done = progress["state"], set(progress.get("first") or [])
    todo = set(range(len(plan))) - done if need_maxima or need_counts or need_predictions else set()
    bar = progress_bar(total=len(todo), desc="pass 1: maxima, labels", unit="win", disable=not todo)
    try:
        for row in rows_of_windows(plan, todo):
            for i in row:
                pair = plan[i]
                if need_counts:
                    counts = job.mask_counts(pair.core)
                    state["counts"] = [a + int(b) for a, b in zip(state["counts"], counts, strict=True)]
                if need_maxima or need_predictions:
                    _, x, _ = job.read(pair.context)
                    if need_maxima:
                        maps = job.raw_maps(x)
                        rows, cols = pair.crop
                        peak = maps[:, rows, cols].flatten(1).amax(dim=1).cpu()
                        state["maxima"] = torch.maximum(torch.tensor(state["maxima"]), peak).tolist()
                        if job.cache is not None:
                            job.cache.save(i, maps)
                    if need_predictions:
                        union = torch.maximum(torch.tensor(state["predicted"]), job.predict(x, pair))
                        state["predicted"] = union.tolist()
                done.add(i)
                bar.update(1)
            save_progress(progress_path, fingerprint, state, first=sorted(done))
    finally:
        bar.close()
    if given is not None:
        present: Tensor | None = given
    elif need_counts:
        present = job.present_from_counts(np.array(state["counts"]))
    elif need_predictions:
        present = torch.tensor(state["predicted"])
    else:
        present = None
    state["present"] = None if present is None else present.tolist()
    save_progress(progress_path, fingerprint, state, second=[])
    return state


def _finished(out: Path, summary_path: Path, fingerprint: str) -> RasterSummary | None:
    """The summary of an output already written from the same inputs, else None."""
    done = finished_summary(out, summary_path, fingerprint)
    return None if done is None else RasterSummary(**{**done, "already_done": True})
