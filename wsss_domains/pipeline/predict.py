"""Stage 4: label-free prediction with a trained segmenter, for splits, folders, rasters and slides.

No image-level label, mask or annotation is read: only pixels. A split's predictions are PNGs that
``evaluate`` scores exactly as it scores pseudo-labels; a raster or a slide becomes one palette
GeoTIFF (pyramidal), written window by window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_domains.data.io import DataError, remove_stale_parts
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.pipeline.data import open_dataset, resolve_device
from wsss_domains.segmentation.inference import InferenceOptions, SegmenterPredictor
from wsss_domains.segmentation.model import SegmenterConfig, load_segmenter
from wsss_domains.segmentation.raster import RasterSource, WindowedOptions, WindowedSummary, predict_windows

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from wsss_domains.segmentation.writer import PredictionSummary

CACHE_FOLDER = "inference"


@dataclass(frozen=True)
class Sharding:
    """How prediction spreads over processes: ``devices`` (GPUs or CPU processes, Lightning's
    ``strategy``) and ``num_workers`` data-loading workers per process."""

    devices: int = 1
    strategy: str = "auto"
    num_workers: int = 0


@dataclass
class LoadedSegmenter:
    folder: Path
    config: SegmenterConfig
    predictor: SegmenterPredictor
    domain: DomainPlugin
    label_space: LabelSpace


def load_predictor(model: Path, options: InferenceOptions | None = None) -> LoadedSegmenter:
    """A trained segmenter folder ready to predict (exported to ONNX Runtime where it runs)."""
    options = options or InferenceOptions()
    options.device = resolve_device(options.device)
    config, network = load_segmenter(Path(model), options.device)
    domain, label_space = config.label_space()
    predictor = SegmenterPredictor(network, config, options, cache=Path(model) / CACHE_FOLDER)
    return LoadedSegmenter(Path(model), config, predictor, domain, label_space)


def predict_split(
    model: Path,
    data: Path,
    out: Path,
    *,
    split: str | None = None,
    dataset: str | None = None,
    options: InferenceOptions | None = None,
    sharding: Sharding | None = None,
) -> PredictionSummary:
    """One prediction PNG per image of a dataset split (only the images' pixels are read)."""
    from wsss_domains.segmentation.writer import PixelsOnly

    def dataset_of(loaded: LoadedSegmenter) -> Dataset:
        opened = open_dataset(
            loaded.config.domain,
            dataset or loaded.config.dataset,
            data,
            split,
            domain_options=loaded.config.domain_options,
        )
        if list(opened.label_space.classes) != list(loaded.config.classes):
            raise UserError(
                f"the segmenter predicts {loaded.config.classes}, but {opened.spec.name} has "
                f"{list(opened.label_space.classes)}"
            )
        return PixelsOnly(opened.dataset)

    return _predict_dataset(model, dataset_of, out, options, sharding)


def predict_folder(
    model: Path,
    images: Path,
    out: Path,
    *,
    options: InferenceOptions | None = None,
    sharding: Sharding | None = None,
) -> PredictionSummary:
    """One prediction PNG per image file under ``images`` (any folder layout, no labels)."""
    from wsss_domains.segmentation.writer import ImageFolder

    return _predict_dataset(model, lambda _: ImageFolder(images), out, options, sharding)


def _predict_dataset(
    model: Path,
    dataset_of: Callable[[LoadedSegmenter], Dataset],
    out: Path,
    options: InferenceOptions | None,
    sharding: Sharding | None,
) -> PredictionSummary:
    from wsss_domains.segmentation.writer import predict_images

    loaded = load_predictor(model, options)
    sharding = sharding or Sharding()
    return predict_images(
        loaded.predictor,
        dataset_of(loaded),
        loaded.domain,
        loaded.label_space,
        out,
        devices=sharding.devices,
        strategy=sharding.strategy,
        num_workers=sharding.num_workers,
        model_name=str(model),
    )


def predict_raster(
    model: Path,
    raster: Path,
    out: Path,
    *,
    bands: tuple[int, ...] | None = None,
    scaling: str = "auto",
    options: InferenceOptions | None = None,
    windowed: WindowedOptions | None = None,
) -> WindowedSummary:
    """One raster of any size into a georeferenced palette GeoTIFF, window by window."""
    if not Path(raster).is_file():
        raise DataError(raster, "file not found")
    loaded = load_predictor(model, options)
    source = RasterSource(Path(raster), bands, scaling)
    return predict_windows(loaded.predictor, loaded.domain, loaded.label_space, source, out, windowed)


def slide_outputs(out: Path, slide: Path) -> tuple[Path, Path]:
    """The label TIFF and thumbnail overlay of one slide inside the output folder."""
    stem = slide.name.split(".")[0] if slide.name.lower().endswith((".ome.tif", ".ome.tiff")) else slide.stem
    return out / f"{stem}.tif", out / f"{stem}.png"


def predict_one_slide(
    loaded: LoadedSegmenter,
    slide: Path,
    out: Path,
    level: int | None,
    mpp: float | None,
    windowed: WindowedOptions,
) -> WindowedSummary:
    from wsss_domains.segmentation.slide import SlideSource, write_thumbnail_overlay

    source = SlideSource(slide, loaded.domain, loaded.label_space, level=level, mpp=mpp)
    tif, png = slide_outputs(out, slide)
    try:
        summary = predict_windows(
            loaded.predictor,
            loaded.domain,
            loaded.label_space,
            source,
            tif,
            windowed,
            extra={"level": source.level, "mpp": source.mpp, "factor": source.factor},
            after_write=lambda labels: write_thumbnail_overlay(
                labels, source.thumbnail, loaded.label_space, png
            ),
        )
        if summary.already_done and not png.is_file():
            write_thumbnail_overlay(tif, source.thumbnail, loaded.label_space, png)
    finally:
        source.close()
    summary.overview = str(png)
    return summary


def find_slides(path: Path) -> list[Path]:
    """``path`` itself, or every slide file in the folder ``path`` (sorted)."""
    from wsss_domains.segmentation.slide import SLIDE_SUFFIXES

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "slide or slide folder not found")
    slides = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES))
    if not slides:
        raise DataError(path, f"no slides ({', '.join(SLIDE_SUFFIXES)}) in this folder")
    return slides


def predict_slides(
    model: Path,
    slides: Path,
    out: Path,
    *,
    level: int | None = None,
    mpp: float | None = None,
    options: InferenceOptions | None = None,
    windowed: WindowedOptions | None = None,
    sharding: Sharding | None = None,
) -> list[WindowedSummary]:
    """Whole-slide images (one file, or every slide in a folder) segmented over tissue.

    Each slide gives ``OUT/<name>.tif`` (pyramidal palette TIFF at the chosen level or resolution)
    and ``OUT/<name>.png`` (labels over the slide's thumbnail). Slides shard across processes
    (``sharding.devices``).
    """
    found = find_slides(slides)
    loaded = load_predictor(model, options)
    windowed = windowed or WindowedOptions()
    sharding = sharding or Sharding()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out)
    if sharding.devices == 1:
        return [predict_one_slide(loaded, slide, out, level, mpp, windowed) for slide in found]
    from wsss_domains.segmentation.writer import shard_items

    return shard_items(
        found,
        lambda slide: predict_one_slide(loaded, slide, out, level, mpp, windowed),
        loaded.predictor,
        devices=sharding.devices,
        strategy=sharding.strategy,
    )
