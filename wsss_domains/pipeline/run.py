"""The whole job in one call: classifier -> pseudo-labels -> segmenter -> label-free prediction.

:func:`run_pipeline` trains the classifier on the training split, pseudo-labels that split with
its image-level labels and the domain's recommended method (:meth:`DomainPlugin.recipe`), trains
the segmenter on those pseudo-labels, segments the test split without reading any of its labels,
and scores every stage where masks exist. It writes one report (JSON, Markdown, HTML) with the two
figures WSSS papers report: pseudo-labels of the training images (labels given) and segmentation
of unseen images (no labels); beside them, the pseudo-labels of the test images with their labels
given, which tells how good pseudo-labels are on those images, and the classifier pipeline run on
the test split with its own predicted labels (no labels), the baseline the segmenter must beat.

Layout of ``out``::

    classifier/              the classifier run (train --out)
    pseudo-labels/train/     pseudo-labels of the training split (labels given)
    pseudo-labels/test/      pseudo-labels of the test split (labels given, at the training split's
                             granularity: whole images, or the classifier's patches; for the figure only)
    pseudo-labels/test-predicted-labels/   the same with the classifier's predicted labels (no labels)
    segmenter/               the segmenter (segment --out)
    predictions/test/        the segmenter's predictions of the test split (no labels)
    report.json, report.md, report.html

Every stage resumes: re-running into the same ``out`` continues where a killed run stopped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wsss_domains.cam.settings import DEFAULT_SCALES, CamSettings
from wsss_domains.domains import Recipe, check_domain_options, create_domain
from wsss_domains.evaluation import EvaluationReport
from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier
from wsss_domains.pipeline.data import has_masks, open_dataset, resolve_device
from wsss_domains.pipeline.evaluate import evaluate_split
from wsss_domains.pipeline.predict import predict_split
from wsss_domains.pipeline.pseudo_labels import ScoredPseudoLabels, pseudo_label_and_score
from wsss_domains.pipeline.report import SEGMENTATION_STAGE, run_gallery, write_run_report
from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter
from wsss_domains.reports.environment import command_line, environment
from wsss_domains.reports.pictures import colours
from wsss_domains.segmentation.inference import InferenceOptions

LABEL_FREE_STAGE = "pseudo-labels (test split, predicted labels: no labels)"


@dataclass
class RunSettings:
    """The whole job's choices; ``None`` fields follow the domain's recipe."""

    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    # Pseudo-labelling method (chain) and its options; None: the domain's recipe.
    method: str | None = None
    method_options: dict[str, object] | None = None
    cam_norm: str | None = None
    # CAM scales; None: the recipe's, else the engine's default.
    scales: tuple[float, ...] | None = None
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    # Also pseudo-label the test split with its labels (only to report how much the segmenter adds).
    test_pseudo_labels: bool = True


@dataclass
class StageResult:
    name: str
    folder: str
    seconds: float
    evaluation: dict[str, Any] | None = None
    note: str = ""


@dataclass
class RunReport:
    domain: str
    dataset: str
    data: str
    train_split: str
    test_split: str
    recipe: dict[str, Any]
    settings: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    # The command line of the process that ran the job, and the machine it ran on.
    command: str = ""
    environment: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(
    domain: str,
    data: Path,
    out: Path,
    *,
    train_split: str,
    test_split: str,
    dataset: str | None = None,
    settings: RunSettings | None = None,
    domain_options: Mapping[str, object] | None = None,
    log: Any = print,
) -> RunReport:
    """Run every stage on ``data`` (train on ``train_split``, segment ``test_split``) into ``out``.

    ``domain_options`` build the domain plugin; checked before any work, recorded in the classifier
    run (and the report), and so reused by every later stage.
    """
    settings = settings or RunSettings()
    out = Path(out)
    domain_options = check_domain_options(domain, domain_options)
    plugin = create_domain(domain, **domain_options)
    spec = plugin.dataset(dataset) if dataset else plugin.detect_dataset(Path(data))
    recipe: Recipe = plugin.recipe(spec.name)
    method = settings.method or recipe.method
    method_options = dict(recipe.method_options if settings.method is None else {})
    method_options.update(settings.method_options or {})
    cam_norm = settings.cam_norm or recipe.cam_norm
    scales = cam_scales(settings.scales, recipe)
    device = resolve_device(settings.classifier.device)
    classifier = replace(
        settings.classifier,
        device=device,
        balance_classes=classifier_balance(settings.classifier.balance_classes, recipe),
    )
    segmenter = replace(
        settings.segmenter,
        device=device,
        arch=settings.segmenter.arch or recipe.segmenter_arch,
        crop_size=settings.segmenter.crop_size or recipe.segmenter_crop,
    )
    segmenter.check()
    inference = replace(settings.inference, device=device)
    report = RunReport(
        domain=domain,
        dataset=spec.name,
        data=str(Path(data).resolve()),
        train_split=train_split,
        test_split=test_split,
        recipe={**asdict(recipe), "method": method, "method_options": method_options, "cam_norm": cam_norm},
        settings={
            "classifier": asdict(classifier),
            "segmenter": asdict(segmenter),
            "scales": list(scales),
            "inference": asdict(inference),
            "domain_options": domain_options,
        },
        command=command_line(),
        environment=environment(),
    )

    def timed(name: str, folder: Path, work: Any, note: str = "") -> Any:
        log(f"== {name} -> {folder}")
        start = time.perf_counter()
        result = work()
        report.stages.append(StageResult(name, str(folder), round(time.perf_counter() - start, 1), note=note))
        return result

    run_dir = out / "classifier"
    trained = timed(
        "classifier",
        run_dir,
        lambda: train_classifier(
            domain,
            data,
            run_dir,
            split=train_split,
            dataset=spec.name,
            settings=classifier,
            domain_options=domain_options,
        ),
    )
    if not trained.is_global_zero:
        return report
    # The training split is pseudo-labelled at the granularity of its labels: whole images, or the
    # classifier's patches (each with its own labels from its mask) when it trained on patches.
    patch = trained.config.patch_size
    pl_options: dict[str, object] = (
        {"labels_from_masks": True, "patch_size": tuple(patch)}
        if trained.config.labels_from_masks and patch
        else {}
    )
    granularity = f"{patch[0]}x{patch[1]} patches" if pl_options else "whole images"
    common = dict(
        method_name=method,
        options=method_options,
        cam=CamSettings(scales=scales, cam_norm=cam_norm),
        device=device,
        dataset_options=pl_options,
        runtime=inference.runtime,
    )
    train_pl = out / "pseudo-labels" / "train"
    scored = timed(
        "pseudo-labels (training split, labels given)",
        train_pl,
        lambda: pseudo_label_and_score(
            run_dir,
            domain,
            spec.name,
            data,
            train_split,
            train_pl,
            labels_from_masks=bool(pl_options),
            save_cams=segmenter.training == "beco",  # BECO's confidence comes from the CAMs
            **common,
        ),
        note=f"method {method}, {granularity}",
    )
    report.stages[-1].evaluation = None if scored.report is None else scored.report.to_dict()
    test_opened = open_dataset(domain, spec.name, data, test_split, domain_options=domain_options)
    test_masks = has_masks(test_opened.dataset)
    if settings.test_pseudo_labels and test_masks:
        test_pl = out / "pseudo-labels" / "test"
        scored = timed(
            "pseudo-labels (test split, labels given)",
            test_pl,
            lambda: pseudo_label_and_score(
                run_dir,
                domain,
                spec.name,
                data,
                test_split,
                test_pl,
                labels_from_masks=True,
                overlays=not pl_options,  # whole images: their CAM heat maps go in the report
                score=True,
                **common,
            ),  # fmt: skip
            note=f"method {method}, {granularity}, labels from their masks",
        )
        report.stages[-1].evaluation = scored.report.to_dict()
    seg_dir = out / "segmenter"
    timed(
        "segmenter",
        seg_dir,
        lambda: fit_segmenter(
            run_dir,
            train_pl,
            data,
            seg_dir,
            split=train_split,
            dataset=spec.name,
            dataset_options=pl_options,
            settings=segmenter,
        ),
        note=f"{segmenter.arch}, trained on the training split's pseudo-labels",
    )
    predictions = out / "predictions" / "test"
    timed(
        SEGMENTATION_STAGE,
        predictions,
        lambda: predict_split(
            seg_dir,
            data,
            predictions,
            split=test_split,
            dataset=spec.name,
            options=inference,
        ),
        note="label-free: only the images' pixels are read",
    )
    if test_masks:
        report.stages[-1].evaluation = evaluate_split(
            domain, spec.name, data, test_split, predictions, domain_options=domain_options
        ).to_dict()
    if settings.test_pseudo_labels and test_masks:
        label_free = out / "pseudo-labels" / "test-predicted-labels"
        scored = timed(
            LABEL_FREE_STAGE,
            label_free,
            lambda: label_free_pseudo_labels(
                run_dir, domain, spec.name, data, test_split, label_free, common
            ),
            note=f"method {method}, whole images, the classifier's predicted image labels",
        )
        report.stages[-1].evaluation = scored.report.to_dict()
    items = None
    if test_masks:
        # The test pseudo-labels' overlays hold the CAM heat maps shown beside each image.
        test_pl = out / "pseudo-labels" / "test"
        folders = {"pseudo-label (labels given)": test_pl, "segmenter (no labels)": predictions}
        if pl_options:  # patch pseudo-labels have no whole-image file to show
            folders.pop("pseudo-label (labels given)")
        heat_maps = test_pl if settings.test_pseudo_labels and not pl_options else None
        items = run_gallery(report, test_opened.dataset, test_opened.label_space, folders, heat_maps)
    write_run_report(report, out, items, colours(test_opened.label_space))
    return report


def cam_scales(chosen: tuple[float, ...] | None, recipe: Recipe) -> tuple[float, ...]:
    """The CAM scales of the job: the user's, else the domain recipe's, else the engine's default."""
    return tuple(float(s) for s in (chosen or recipe.cam_scales or DEFAULT_SCALES))


def classifier_balance(chosen: float | None, recipe: Recipe) -> float | None:
    """The classifier's balancing threshold: the user's (0: uniform sampling), else the recipe's."""
    return recipe.classifier_balance if chosen is None else chosen


def label_free_pseudo_labels(
    run: Path, domain: str, dataset: str, data: Path, split: str, out: Path, common: dict[str, Any]
) -> ScoredPseudoLabels:
    """The classifier pipeline on unlabelled images: pseudo-labels from its own predicted labels.

    The baseline the segmenter must beat on images without labels; at the granularity of the other
    pseudo-labels (``common["dataset_options"]``: whole images or patches, each labelled on its own).
    """
    options = {**common, "overlays": False}
    return pseudo_label_and_score(
        run, domain, dataset, data, split, out, label_free="predicted", score=True, **options
    )


def headline(report: RunReport) -> list[tuple[str, float | None]]:
    """(stage, mIoU) of every scored stage, in order."""
    rows = []
    for stage in report.stages:
        if stage.evaluation is not None:
            rows.append((stage.name, stage.evaluation.get("miou")))
    return rows


def evaluation_of(stage: StageResult) -> EvaluationReport | None:
    if stage.evaluation is None:
        return None
    return EvaluationReport.from_dict(stage.evaluation)
