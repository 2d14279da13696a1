"""Writing pseudo-labels for a split: palette PNGs, optional raw CAMs, overlays; resumable.

Each image's label PNG is written last and atomically, so its presence marks the image done: a
re-run skips finished images and a killed run resumes where it stopped, with no half-written file.

Images above ``max_image_pixels`` (where the loader can name their files, see
:mod:`wsss_domains.data.large_images`) are labelled window by window by the raster engine, so
memory depends on the window, not on the image; their overlay is a downsampled label picture and
their raw CAMs are not saved (they would be as large as the problem).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.data.io import DataError, atomic_write, output_folder, read_index_mask, save_palette_png
from wsss_domains.data.large_images import (
    LARGE_IMAGE_PIXELS,
    SCRATCH_FOLDER,
    WINDOW_TILE_SIZE,
    ImageFile,
    geotiff_to_png,
    large_image_file,
    remove_scratch,
    stage_image,
)
from wsss_domains.domains.contract import BackgroundMode, DomainPlugin, LabelSpace, Sample
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.progress import progress_bar
from wsss_domains.pseudo_labels.assemble import cams_to_labels, labels_from_logits
from wsss_domains.pseudo_labels.overlay import render_overlay, save_overlay
from wsss_domains.training.data import normalize
from wsss_domains.training.run import RunConfig

SUMMARY_FILE = "pseudo-labels.json"


@dataclass
class PseudoLabelOptions:
    # auto | given | masks | predicted | all | segmentation. Without labels: ``predicted`` (the
    # classifier's), ``all`` (every class, the method's own pixel decisions choose) or
    # ``segmentation`` (read off ``label_segmentation``, e.g. the segmenter's predictions).
    label_source: str = "auto"
    label_segmentation: Path | None = None
    # ``segmentation``: the share of a sample's scored pixels a class needs to be present (0: one pixel).
    label_fraction: float = 0.0
    bg_threshold: float | None = None
    save_cams: bool = False
    overlays: bool = True
    max_overlays: int | None = 200
    device: str = "cpu"
    # Larger images go window by window (None: never); needs the run's config, see write_pseudo_labels.
    max_image_pixels: int | None = LARGE_IMAGE_PIXELS
    # Their windows' side and context margin (the raster engine's defaults, 1024 and 128).
    window: int | None = None
    margin: int | None = None


@dataclass
class PseudoLabelSummary:
    out: str
    written: int = 0
    skipped: int = 0
    label_source: str = ""
    predicted_label_images: int = 0
    bg_threshold: float | None = None
    files: list[str] = field(default_factory=list)
    windowed: list[str] = field(default_factory=list)  # images labelled window by window


def image_labels(
    sample: Sample,
    label_space: LabelSpace,
    source: str,
    segmentation: Path | None = None,
    fraction: float = 0.0,
) -> Tensor | None:
    """The image-level labels pseudo-labelling uses (``source``: see :class:`PseudoLabelOptions`), or
    None where the classifier must predict them."""
    if source in ("masks",) or (source == "auto" and "label" not in sample and "mask" in sample):
        if "mask" not in sample:
            raise ValueError(f"sample {sample['id']} has no mask to derive labels from (--labels-from-masks)")
        mask = sample["mask"]
        if "exclude" in sample:
            mask = mask.masked_fill(sample["exclude"], label_space.ignore_index)
        return label_space.label_from_mask(mask)
    if source == "predicted":
        return None
    if source == "all":
        return torch.ones(len(label_space.foreground))
    if source == "segmentation":
        if segmentation is None:
            raise ValueError("label source 'segmentation' needs a folder of segmentations to read labels off")
        return labels_from_segmentation(sample, label_space, segmentation, fraction)
    return sample.get("label")


@lru_cache(maxsize=4)
def _segmentation(path: str, mtime_ns: int) -> Tensor:
    """A segmentation file, read once for all the patches of its image (keyed by its modification time)."""
    return read_index_mask(path)


def labels_from_segmentation(
    sample: Sample, label_space: LabelSpace, folder: Path, fraction: float = 0.0
) -> Tensor:
    """The classes covering ``fraction`` of ``sample``'s scored pixels (at least one) in its segmentation
    in ``folder`` (its own file, or its parent's at the sample's offset for a patch).

    Why: on images without labels, a segmenter's prediction can name an image's classes in place of
    the classifier's logits, while a post-hoc method draws their borders.
    """
    from wsss_domains.data.patches import label_from_crop

    meta = sample.get("meta", {})
    parent = meta.get("parent", sample["id"])
    path = Path(folder) / pred_filename(parent)
    if not path.is_file():
        raise DataError(path, f"no segmentation of {parent} to read sample {sample['id']}'s labels from")
    y, x = meta.get("offset", (0, 0)) if "parent" in meta else (0, 0)
    h, w = sample["image"].shape[-2:]
    crop = _segmentation(str(path), path.stat().st_mtime_ns)[y : y + h, x : x + w]
    if tuple(crop.shape) != (h, w):
        raise DataError(
            path, f"segmentation of {tuple(crop.shape)} pixels does not cover sample {sample['id']}"
        )
    if "exclude" in sample:
        crop = crop.masked_fill(sample["exclude"], label_space.ignore_index)
    return label_from_crop(label_space, crop, min_fraction=fraction)


def write_pseudo_labels(
    dataset: Dataset,
    extractor: CamExtractor,
    method: Method,
    domain: DomainPlugin,
    label_space: LabelSpace,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    out: Path,
    options: PseudoLabelOptions,
    config: RunConfig | None = None,
) -> PseudoLabelSummary:
    """Pseudo-label every sample not yet done in ``out`` (a killed job resumes where it stopped).

    ``config``: the run's configuration, which the window-by-window path of large images needs;
    without it every image is labelled whole.
    """
    with output_folder(out) as out:
        method.setup(domain, mean, std)
        bg = options.bg_threshold
        if label_space.background_mode is BackgroundMode.THRESHOLD and bg is None:
            bg = domain.background_threshold(label_space)
        summary = PseudoLabelSummary(out=str(out), label_source=options.label_source, bg_threshold=bg)
        palette = label_space.flat_palette()
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the split holds no images")
        limit = options.max_image_pixels if config is not None else None
        for index in progress_bar(range(n), desc="pseudo-labels", unit="img"):
            large = large_image_file(dataset, index, limit)
            if large is not None:
                assert config is not None
                name = pred_filename(large.id)
                summary.files.append(name)
                summary.windowed.append(name)
                if (out / name).is_file():
                    summary.skipped += 1
                    continue
                predicted = _label_large_image(large, config, extractor, method, out / name, bg, options)
                summary.predicted_label_images += predicted
                summary.written += 1
                continue
            sample: Sample = dataset[index]
            name = pred_filename(sample["id"])
            label_path = out / name
            cam_path = out / "cams" / (name[: -len(".png")] + ".npz")
            summary.files.append(name)
            if label_path.is_file() and (not options.save_cams or cam_path.is_file()):
                summary.skipped += 1
                continue
            raw = sample["image"]
            prepared = domain.preprocess(raw)
            image = normalize(prepared, mean, std).to(options.device)
            cams = extractor(image)
            present = image_labels(
                sample, label_space, options.label_source, options.label_segmentation, options.label_fraction
            )
            if present is None:
                with torch.no_grad():  # at the magnification the classifier was trained at
                    logits = extractor.model(extractor.training_view(image))["logits"][0]
                present = labels_from_logits(logits)
                summary.predicted_label_images += 1
            if present.numel() != len(label_space.foreground):
                raise ValueError(
                    f"sample {sample['id']}: label vector has {present.numel()} entries, "
                    f"expected {len(label_space.foreground)} ({', '.join(label_space.foreground_names)})"
                )
            present = present.to(cams.device)
            exclude = sample.get("exclude")
            if exclude is None:
                exclude = domain.exclude_mask(raw, label_space)
            context = RefineContext(
                raw.to(cams.device),
                present,
                domain,
                label_space,
                bg,
                exclude,
                prepared.to(cams.device),
                image,
            )
            cams = method.refine(cams, context)
            labels_map = cams_to_labels(cams, present, label_space, bg, exclude)
            labels_map = method.refine_labels(labels_map, cams, context)
            labels = labels_map.cpu().numpy()
            if options.save_cams:
                keep = present.bool().cpu()
                data = cams.cpu()[keep].numpy().astype(np.float16)
                classes = np.array([label_space.foreground_names[i] for i in np.flatnonzero(keep.numpy())])

                def _write_cams(tmp: Path, data: np.ndarray = data, classes: np.ndarray = classes) -> None:
                    with open(tmp, "wb") as fh:
                        np.savez_compressed(fh, cams=data, classes=classes)

                atomic_write(cam_path, _write_cams)
            if options.overlays and (options.max_overlays is None or summary.written < options.max_overlays):
                keep = present.bool().cpu()
                picture = render_overlay(
                    raw.permute(1, 2, 0).numpy(),
                    labels,
                    cams.cpu()[keep].numpy(),
                    [label_space.foreground_names[i] for i in np.flatnonzero(keep.numpy())],
                    palette,
                )
                save_overlay(out / "overlays" / name, picture)
            save_palette_png(label_path, labels, palette)
            summary.written += 1
        text = json.dumps(asdict(summary) | {"files": len(summary.files)}, indent=2)
        atomic_write(out / SUMMARY_FILE, lambda tmp: tmp.write_text(text))
        return summary


def _label_large_image(
    file: ImageFile,
    config: RunConfig,
    extractor: CamExtractor,
    method: Method,
    label_path: Path,
    bg: float | None,
    options: PseudoLabelOptions,
) -> bool:
    """One image above the size limit, window by window, into its palette PNG; True if labels were predicted.

    Labels read off a segmentation (``label_source="segmentation"``) come from its file taken as a
    mask raster, window by window, the same share of scored pixels required as for a whole image.

    The image is staged as a tiled GeoTIFF where its format cannot read windows, labelled by the
    raster engine into a GeoTIFF beside the output (resumable), then streamed into the PNG.
    """
    from wsss_domains.pseudo_labels.raster import RasterOptions, pseudo_label_raster

    label, mask, fraction = file.label, None, 0.0
    if options.label_source == "segmentation":
        if options.label_segmentation is None:
            raise ValueError("label source 'segmentation' needs a folder of segmentations to read labels off")
        # Read window by window as a mask raster, like the image itself.
        label, mask, fraction = (
            None,
            Path(options.label_segmentation) / pred_filename(file.id),
            options.label_fraction,
        )
        if not mask.is_file():
            raise DataError(mask, f"no segmentation of {file.id} to read its labels from")
    elif options.label_source == "predicted":
        label = None
    elif options.label_source == "all":
        label = torch.ones(len(config.foreground))
    elif options.label_source == "masks" or label is None:
        if file.mask is None:
            raise DataError(file.path, "no image-level label and no mask to derive one from")
        label, mask = None, file.mask
    scratch = label_path.parent / SCRATCH_FOLDER
    staged = stage_image(file.path, scratch)
    tif = scratch / f"{label_path.stem}.tif"
    overview = None
    if options.overlays:
        overview = label_path.parent / "overlays" / label_path.name
        overview.parent.mkdir(parents=True, exist_ok=True)
    raster_options = RasterOptions(
        bg_threshold=bg, overview=overview, device=options.device, label_fraction=fraction
    )
    if options.window is not None:
        raster_options.window = options.window
    if options.margin is not None:
        raster_options.margin = options.margin
    windowed = copy.copy(extractor)
    windowed.tile_size = min(extractor.tile_size, WINDOW_TILE_SIZE)
    pseudo_label_raster(
        config,
        extractor.model,
        method,
        staged,
        tif,
        labels=label,
        mask=mask,
        options=raster_options,
        extractor=windowed,
    )
    atomic_write(label_path, lambda tmp: geotiff_to_png(tif, tmp))
    remove_scratch(file.path, staged, tif)
    return label is None and mask is None
