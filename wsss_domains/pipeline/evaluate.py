"""Scoring a folder of label PNGs (pseudo-labels or segmenter predictions) against a split's masks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from wsss_domains.data.io import atomic_write
from wsss_domains.evaluation import EvaluationReport, evaluate_predictions
from wsss_domains.pipeline.data import OpenedData, open_dataset, scored_samples
from wsss_domains.reports.environment import command_line, environment
from wsss_domains.reports.html import (
    environment_block,
    evaluation_section,
    gallery,
    legend,
    page,
    section,
    tag,
)
from wsss_domains.reports.pictures import colours, gallery_items

# The evaluation page shows this many images, worst first: enough to see what fails, not a dump.
MAX_IMAGES = 12


def evaluate_split(
    domain: str,
    dataset: str | None,
    data: Path,
    split: str | None,
    pred: Path,
    dataset_options: Mapping[str, object] | None = None,
    *,
    domain_options: Mapping[str, object] | None = None,
    html: Path | None = None,
) -> EvaluationReport:
    """``dataset_options`` must match the ones the predictions were written with (same sample ids);
    ``domain_options`` build the domain plugin (whose exclude masks and metrics score the split).
    ``html``: also write the evaluation page there (:func:`evaluation_page`)."""
    opened = open_dataset(
        domain, dataset, data, split, domain_options=domain_options, **(dataset_options or {})
    )
    # A union of splits is scored (and pictured) by its annotated parts.
    opened = replace(opened, dataset=scored_samples(opened.dataset))
    report = evaluate_predictions(opened.domain, opened.label_space, opened.dataset, pred)
    if html is not None:
        text = evaluation_page(report, opened, Path(pred))
        atomic_write(Path(html), lambda tmp: tmp.write_text(text))
    return report


def evaluation_page(
    report: EvaluationReport,
    opened: OpenedData,
    pred: Path,
    command: str | None = None,
    limit: int = MAX_IMAGES,
) -> str:
    """A self-contained page: scores, per-class IoU, the confusion matrix, the ``limit`` worst images
    (image, ground truth, prediction; CAM heat maps when ``pred`` holds pseudo-label overlays), and
    the command and environment."""
    palette = colours(opened.label_space)
    heat_maps = pred if (pred / "overlays").is_dir() else None
    items = gallery_items(
        opened.dataset, opened.label_space, {"prediction": pred}, report.worst_images(limit), heat_maps
    )
    title = f"{opened.domain.name} / {opened.spec.name} / {opened.split}"
    return page(
        f"wsss-domains evaluate: {title}",
        tag("h1", f"Evaluation: {title}"),
        tag(
            "p",
            "Predictions ",
            tag("code", str(pred)),
            f" scored against the masks of {report.n_images} images.",
            class_="lead",
        ),
        section("Scores, per-class IoU and confusion", evaluation_section(report, palette)),
        section(
            "Worst images",
            tag("p", "Worst first by per-image mIoU.", class_="muted"),
            legend(palette),
            gallery(items, of_total=report.n_images),
        ),
        environment_block(command_line() if command is None else command, environment()),
    )


def write_report(report: EvaluationReport, json_path: Path | None, plot_path: Path | None) -> None:
    """The report as JSON and as a per-class bar chart, each where a path is given."""
    if json_path is not None:
        text = report.to_json()
        atomic_write(json_path, lambda tmp: tmp.write_text(text))
    if plot_path is not None:
        report.plot_per_class(plot_path)
