"""Stage 2 of WSSS: CAMs of a trained run turned into pseudo-labels, for a split or one raster.

A split gives one palette PNG per image (:mod:`wsss_domains.pseudo_labels.writer`); a raster gives
one palette GeoTIFF written window by window (:mod:`wsss_domains.pseudo_labels.raster`). Methods
that learn from the run's training split (``seed-probe``, ``label-probe``) fit here first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.cam.settings import CamSettings
from wsss_domains.data.io import DataError
from wsss_domains.data.large_images import LARGE_IMAGE_PIXELS
from wsss_domains.data.patches import PatchDataset
from wsss_domains.data.splits import union_parts
from wsss_domains.data.windows import pair
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.evaluation import EvaluationReport
from wsss_domains.methods import Method, create_method
from wsss_domains.methods.fitting import FIT_FOLDER, FitContext, extractor_settings
from wsss_domains.models.runtime import resolve_runtime
from wsss_domains.pipeline.data import has_masks, open_dataset, validate_dataset
from wsss_domains.pipeline.evaluate import evaluate_split
from wsss_domains.pseudo_labels.raster import RasterOptions, RasterSummary, pseudo_label_raster
from wsss_domains.pseudo_labels.writer import PseudoLabelOptions, PseudoLabelSummary, write_pseudo_labels
from wsss_domains.training.run import MODEL_FILE, RunConfig, load_run, run_label_space

# Exported networks (ONNX) are cached in the run folder.
RUNTIME_CACHE = "inference"
# Where the labels of images pseudo-labelled without their own come from (see ``pseudo_label_split``).
LABEL_FREE_SOURCES = ("predicted", "all", "segmentation")


def recorded_domain_options(config: RunConfig, domain_name: str | None = None) -> dict[str, object]:
    """The run's domain options where ``domain_name`` is the run's domain (or None); else none.

    A run's images must be prepared as in training (stain normalisation, ...), so the plugin is
    rebuilt with the options ``run.json`` recorded; another domain's plugin would refuse them.
    """
    same = domain_name is None or domain_name == config.domain
    return dict(config.domain_options) if same else {}


def cam_extractor(
    method: Method, model: nn.Module, modules: nn.Module, cam: CamSettings, config: RunConfig
) -> CamExtractor:
    """The method's extractor with ``cam``'s scales, flip and normalisation (a ``RasterOptions`` is one)."""
    return method.extractor(
        model,
        modules,
        scales=cam.scales,
        flip=cam.flip,
        base_scale=config.base_scale,
        normalization=cam.cam_norm,
    )


def label_source(
    label_free: str | None, labels_from_masks: bool, dataset_options: Mapping[str, object] | None
) -> str:
    """Where each image's labels come from (:class:`PseudoLabelOptions`).

    A loader opened with ``labels_from_masks`` already derives every sample's label from its mask
    by the dataset's own rule, the rule its classifier was trained with (a driving crop's class
    needs 1% of the crop): the sample's label is used then, not a second derivation that would
    let a few stray pixels of a class into it.
    """
    if label_free is not None:
        if label_free not in LABEL_FREE_SOURCES:
            raise UserError(f"label_free must be one of {', '.join(LABEL_FREE_SOURCES)}, got {label_free!r}")
        return label_free
    if labels_from_masks and not (dataset_options or {}).get("labels_from_masks"):
        return "masks"
    return "auto"


def pseudo_label_split(
    run: Path,
    domain_name: str | None,
    dataset: str | None,
    data: Path,
    split: str | None,
    out: Path,
    labels_from_masks: bool = False,
    method_name: str | None = None,
    options: dict[str, object] | None = None,
    cam: CamSettings | None = None,
    save_cams: bool = False,
    overlays: bool = True,
    device: str = "cpu",
    dataset_options: Mapping[str, object] | None = None,
    runtime: str = "auto",
    label_free: str | None = None,
    label_segmentation: Path | None = None,
    label_fraction: float = 0.0,
    max_image_pixels: int | None = LARGE_IMAGE_PIXELS,
) -> PseudoLabelSummary:
    """Pseudo-label every image of ``split`` with the run at ``run`` into PNGs in ``out``.

    ``cam``: scales, flips, CAM normalisation and background threshold (default: :class:`CamSettings`).
    ``dataset_options`` go to the loader, e.g. ``labels_from_masks``/``patch_size`` to score tiles.
    ``runtime``: where the CAM pass runs (``auto``: ONNX Runtime on the CPU, see
    :mod:`wsss_domains.models.runtime`). ``label_free``: ignore the split's image-level labels and
    use the classifier's predictions (``predicted``), every class (``all``: the method's own pixel
    decisions choose) or the classes of each image's segmentation in ``label_segmentation`` (a
    folder as ``predict`` writes it; a class needs ``label_fraction`` of the scored pixels).
    ``max_image_pixels``: larger images are labelled window by window in bounded memory (None: never).
    """
    cam = cam or CamSettings()
    config, model, modules = load_run(run, device)
    opened = open_dataset(
        domain_name or config.domain,
        dataset,
        data,
        split,
        domain_options=recorded_domain_options(config, domain_name),
        **(dataset_options or {}),
    )
    label_space = opened.label_space
    if list(label_space.foreground_names) != config.foreground:
        raise UserError(
            f"the run was trained on classes {config.foreground}, but {opened.spec.name} has "
            f"{list(label_space.foreground_names)}"
        )
    # Bad files fail here, before the first pseudo-label is written.
    large_images = validate_dataset(opened.dataset, label_space, max_image_pixels)
    name = method_name or config.method
    merged = {**(config.method_options if name == config.method else {}), **(options or {})}
    method = create_method(name, **merged)
    if name != config.method:
        modules = method.build_modules(model).to(device)
    extractor = cam_extractor(method, model, modules, cam, config)
    # ONNX Runtime's arena keeps its largest allocation: faster, but unbounded for large images' windows.
    extractor.use_runtime(
        resolve_runtime(runtime, device), cache=Path(run) / RUNTIME_CACHE, arena=large_images == 0
    )
    fit_on_training_split(method, config, run, extractor, opened.domain, label_space)
    options = PseudoLabelOptions(
        label_source=label_source(label_free, labels_from_masks, dataset_options),
        label_segmentation=label_segmentation,
        label_fraction=label_fraction,
        bg_threshold=cam.bg_threshold,
        save_cams=save_cams,
        overlays=overlays,
        device=device,
        max_image_pixels=max_image_pixels,
    )
    return write_pseudo_labels(
        opened.dataset,
        extractor,
        method,
        opened.domain,
        label_space,
        config.mean,
        config.std,
        out,
        options,
        config=config,
    )


def fit_on_training_split(
    method: Method,
    config: RunConfig,
    run: Path,
    extractor: CamExtractor,
    domain: DomainPlugin,
    label_space: LabelSpace,
) -> None:
    """Let a method that learns from the training split (``seed-probe``) fit, before any image is written.

    The split is reopened as the run recorded it (folder, split, patches); the fitted state is
    cached in the run folder, keyed by the run's weights file, the extractor settings and the
    method's options.
    """
    if not method.fits_training_split:
        return
    if config.data is None:
        raise UserError(
            f"method '{method.name}' fits on the run's training data, which {run} does not record"
        )
    if not Path(config.data).exists():
        raise UserError(
            f"method '{method.name}' fits on the run's training split, but its folder {config.data} is gone "
            "(move it back, or use a method that does not fit)"
        )
    training = open_dataset(
        config.domain,
        config.dataset,
        Path(config.data),
        config.split,
        domain_options=config.domain_options,
        labels_from_masks=config.labels_from_masks,
        patch_size=tuple(config.patch_size) if config.patch_size else None,
    )
    weights = Path(run) / MODEL_FILE
    stamp = weights.stat() if weights.is_file() else None
    settings = {
        **extractor_settings(extractor),
        "weights": [stamp.st_size, stamp.st_mtime_ns] if stamp else None,
        "split": [config.data, config.split, config.labels_from_masks, config.patch_size],
    }
    method.setup(domain, config.mean, config.std)
    method.fit(
        FitContext(
            dataset=training.dataset,
            extractor=extractor,
            domain=domain,
            label_space=label_space,
            mean=config.mean,
            std=config.std,
            cache_dir=Path(run) / FIT_FOLDER,
            settings=settings,
            window_factory=_window_factory(config)
            if config.labels_from_masks and config.patch_size
            else None,
        )
    )


def _window_factory(config: RunConfig) -> Callable[[], Dataset]:
    """The run's annotated training images as overlapping mask-labelled windows of its patch size.

    Each window is labelled by the loader's own rule where the loader cuts patches (a driving crop's
    class needs 1% of it), the rule the classifier was trained with; else by any pixel of a class.
    A part of a union of splits without masks (patches labelled by file name) gives its images whole.
    """

    def build() -> Dataset:
        patch = pair(tuple(config.patch_size))  # type: ignore[arg-type]
        parts = [_split_windows(config, part, patch) for part in union_parts(config.split)]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    return build


def _split_windows(config: RunConfig, split: str, patch: tuple[int, int]) -> Dataset:
    """One split's windows for :func:`_window_factory`, at a quarter of the patch size's stride."""
    stride = (max(1, patch[0] // 4), max(1, patch[1] // 4))
    data = Path(config.data)  # type: ignore[arg-type]
    opened = open_dataset(config.domain, config.dataset, data, split, domain_options=config.domain_options)
    if not has_masks(opened.dataset):
        return opened.dataset
    patched = open_dataset(
        config.domain,
        config.dataset,
        data,
        split,
        domain_options=config.domain_options,
        labels_from_masks=True,
        patch_size=patch,
    )
    if isinstance(patched.dataset, PatchDataset):
        return patched.dataset.recut(patched.dataset.base, stride=stride)
    return PatchDataset(opened.dataset, opened.label_space, patch, stride=stride)


def pseudo_label_raster_file(
    run: Path,
    raster: Path,
    out: Path,
    *,
    mask: Path | None = None,
    labels: list[str] | None = None,
    method_name: str | None = None,
    options: dict[str, object] | None = None,
    raster_options: RasterOptions | None = None,
) -> RasterSummary:
    """Load a run and pseudo-label one raster with it (see :func:`pseudo_label_raster`)."""
    raster_options = raster_options or RasterOptions()
    for path in (raster, mask):
        if path is not None and not Path(path).is_file():
            raise DataError(path, "file not found")
    device = raster_options.device
    config, model, modules = load_run(run, device)
    # The method as pseudo_label_split builds it.
    name = method_name or config.method
    merged = {**(config.method_options if name == config.method else {}), **(options or {})}
    method = create_method(name, **merged)
    if name != config.method:
        modules = method.build_modules(model).to(device)
    if method.fits_training_split:
        domain, label_space = run_label_space(config)
        extractor = cam_extractor(method, model, modules, raster_options, config)
        fit_on_training_split(method, config, run, extractor, domain, label_space)
    return pseudo_label_raster(
        config, model, method, raster, out, modules=modules, labels=labels, mask=mask, options=raster_options
    )


@dataclass
class ScoredPseudoLabels:
    """Pseudo-labels of a split and, where the split has masks, their evaluation."""

    summary: PseudoLabelSummary
    report: EvaluationReport | None
    pseudo_label_seconds: float
    evaluate_seconds: float = 0.0


def pseudo_label_and_score(
    run: Path,
    domain_name: str,
    dataset: str | None,
    data: Path,
    split: str | None,
    out: Path,
    *,
    score: bool | None = None,
    dataset_options: Mapping[str, object] | None = None,
    **options: Any,
) -> ScoredPseudoLabels:
    """:func:`pseudo_label_split`, then :func:`evaluate_split` on the same samples.

    ``score``: True to evaluate, False not to, None where the split's samples carry masks. The one
    place where pseudo-labelling and its evaluation are chained (``run``, ``bench``, benchmarks).
    """
    start = time.perf_counter()
    summary = pseudo_label_split(
        run,
        domain_name,
        dataset,
        data,
        split,
        out,
        dataset_options=dataset_options,
        **options,
    )
    seconds = time.perf_counter() - start
    domain_options = recorded_domain_options(RunConfig.load(run), domain_name)
    if score is None:
        opened = open_dataset(
            domain_name, dataset, data, split, domain_options=domain_options, **dict(dataset_options or {})
        )
        score = has_masks(opened.dataset)
    if not score:
        return ScoredPseudoLabels(summary, None, seconds)
    start = time.perf_counter()
    report = evaluate_split(
        domain_name, dataset, data, split, out, dataset_options, domain_options=domain_options
    )
    return ScoredPseudoLabels(summary, report, seconds, time.perf_counter() - start)
