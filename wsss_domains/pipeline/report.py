"""The report of a whole job (``wsss-domains run``): JSON for tools, Markdown and HTML for people.

The HTML page is self-contained (pictures embedded, no external resource), so it can be mailed or
archived as one file: the headline figures, each scored stage's per-class IoU and confusion matrix,
the test images the segmenter did worst on, and the command and environment that made it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from wsss_domains.data.io import atomic_write
from wsss_domains.domains.contract import LabelSpace
from wsss_domains.evaluation.report import EvaluationReport
from wsss_domains.reports.html import (
    DEFAULT_SHOWN,
    Colour,
    GalleryItem,
    environment_block,
    evaluation_section,
    gallery,
    legend,
    page,
    score,
    section,
    table,
    tag,
)
from wsss_domains.reports.pictures import first_images, gallery_items

if TYPE_CHECKING:
    from wsss_domains.pipeline.run import RunReport

# The gallery holds this many test images (worst first); its filter shows fewer at first.
MAX_PICTURES = 24
SEGMENTATION_STAGE = "segmentation (test split, no labels)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _scored(report: RunReport) -> list[tuple[str, dict[str, Any]]]:
    return [(s.name, s.evaluation) for s in report.stages if s.evaluation is not None]


def balancing(report: RunReport) -> str:
    """A sentence on how the classifier drew its training images where it balanced them (a recipe may
    choose it unseen by the user), else nothing."""
    threshold = report.settings.get("classifier", {}).get("balance_classes")
    return (
        f" Classifier trained on class-balanced images (repeat factors, T = {threshold:g})."
        if threshold
        else ""
    )


def markdown(report: RunReport) -> str:
    """Headline table, per-class IoU and stage timings as Markdown."""
    lines = [
        f"# {report.domain} / {report.dataset}: train `{report.train_split}`, segment `{report.test_split}`",
        "",
        f"Data: `{report.data}`. Pseudo-labelling method: `{report.recipe['method']}` "
        f"({report.recipe.get('why', '')}).{balancing(report)}",
        "",
        "| stage | mIoU | images | seconds | note |",
        "|---|---|---|---|---|",
    ]
    for stage in report.stages:
        ev = stage.evaluation
        miou = _fmt(ev["miou"]) if ev else "not scored"
        images = str(ev["n_images"]) if ev else ""
        lines.append(f"| {stage.name} | {miou} | {images} | {stage.seconds:.0f} | {stage.note} |")
    scored = _scored(report)
    if scored:
        classes = list(scored[0][1]["per_class_iou"])
        lines += ["", "Per-class IoU:", "", "| stage | " + " | ".join(classes) + " |"]
        lines.append("|---|" + "---|" * len(classes))
        for name, ev in scored:
            lines.append(
                f"| {name} | " + " | ".join(_fmt(ev["per_class_iou"].get(c)) for c in classes) + " |"
            )
    return "\n".join(lines) + "\n"


def stage_evaluations(report: RunReport) -> list[tuple[str, EvaluationReport]]:
    """Every scored stage's evaluation, rebuilt from the report's JSON-ready dicts."""
    return [(name, EvaluationReport.from_dict(ev)) for name, ev in _scored(report)]


def run_gallery(
    report: RunReport,
    dataset: Any,
    label_space: LabelSpace,
    folders: Mapping[str, Path],
    heat_maps: Path | None = None,
    limit: int = MAX_PICTURES,
) -> list[GalleryItem]:
    """The test images worst first by the segmenter's per-image mIoU (else by the last scored stage
    that has per-image scores), beside their ground truth, each folder's labels and the CAM heat
    maps; the first images, unscored, where nothing was scored."""
    ranked: list[tuple[str, float | None]] = []
    for name in (SEGMENTATION_STAGE, *reversed([n for n, _ in _scored(report)])):
        stage = report.stage(name)
        if stage is not None and stage.evaluation is not None:
            scores = EvaluationReport.from_dict(stage.evaluation)
            if scores.per_image:
                ranked = list(scores.worst_images(limit))
                break
    if not ranked:
        ranked = first_images(dataset, limit)
    return gallery_items(dataset, label_space, folders, ranked, heat_maps)


def _overlay_items(out: Path) -> list[GalleryItem]:
    """Without masks: the prediction writer's overlays of the first test images, unscored."""
    items = []
    for path in sorted((out / "predictions" / "test" / "overlays").glob("*.png"))[:DEFAULT_SHOWN]:
        with Image.open(path) as picture:
            panel = ("image | prediction", picture.convert("RGB"))
            items.append(GalleryItem(path.stem, None, [panel], panel_width=440))  # two panels in one
    return items


def _stage_rows(report: RunReport) -> list[list[object]]:
    rows: list[list[object]] = []
    for s in report.stages:
        ev = s.evaluation
        rows.append(
            [
                s.name,
                _fmt(ev["miou"]) if ev else "not scored",
                str(ev["n_images"]) if ev else "",
                f"{s.seconds:.0f}",
                s.note,
            ]
        )
    return rows


def html_page(
    report: RunReport,
    out: Path,
    items: list[GalleryItem] | None = None,
    colours: Mapping[str, Colour] | None = None,
) -> str:
    """A self-contained page: the stage table, per-class IoU of every scored stage with its confusion
    matrix, the test images worst first, the command and the environment."""
    method = report.recipe["method"]
    why = report.recipe.get("why", "")
    parts: list[object] = [
        tag("h1", f"{report.domain} / {report.dataset}"),
        tag(
            "p",
            "Trained on ",
            tag("code", report.train_split),
            ", segmented ",
            tag("code", report.test_split),
            " without labels. Data: ",
            tag("code", report.data),
            ". Pseudo-labelling method: ",
            tag("code", method),
            f" \u2014 {why}." if why else ".",
            balancing(report),
            class_="lead",
        ),
        section(
            "Stages",
            table(["stage", "mIoU", "images", "seconds", "note"], _stage_rows(report), numeric=(1, 2, 3)),
        ),
    ]
    evaluations = stage_evaluations(report)
    if evaluations:
        classes = list(evaluations[0][1].per_class_iou)
        rows = [[name, *(score(ev.per_class_iou.get(c)) for c in classes)] for name, ev in evaluations]
        parts.append(
            section("Per-class IoU", table(["stage", *classes], rows, numeric=range(1, len(classes) + 1)))
        )
        details = [
            tag(
                "details",
                tag("summary", f"{name}: mIoU {score(ev.miou)}, {ev.n_images} images"),
                evaluation_section(ev, colours),
                open="open" if name == SEGMENTATION_STAGE or len(evaluations) == 1 else None,
            )
            for name, ev in evaluations
        ]
        parts.append(section("Scores, per-class IoU and confusion of each scored stage", *details))
    items = list(items or []) or _overlay_items(Path(out))
    if items:
        scored = any(item.score is not None for item in items)
        lead = (
            "The test images the segmenter did worst on first (per-image mIoU), each beside its ground "
            "truth, the labels of each stage and, where pseudo-labelling drew them, its per-class CAM heat maps."
            if scored
            else "The first test images with the segmenter's labels (no masks to score them against)."
        )
        parts.append(
            section(
                "Test images: segmentation without labels",
                tag("p", lead, class_="muted"),
                legend(colours) if colours else "",
                gallery(items, of_total=_test_images(report)),
            )
        )
    parts.append(environment_block(report.command, report.environment))
    return page(f"wsss-domains run: {report.domain} / {report.dataset}", *parts)


def _test_images(report: RunReport) -> int | None:
    stage = report.stage(SEGMENTATION_STAGE)
    return None if stage is None or stage.evaluation is None else int(stage.evaluation["n_images"])


def write_run_report(
    report: RunReport,
    out: Path,
    items: list[GalleryItem] | None = None,
    colours: Mapping[str, Colour] | None = None,
) -> None:
    """``report.json``, ``report.md`` and ``report.html`` in ``out``."""
    out = Path(out)
    data = json.dumps(report.to_dict(), indent=2, default=str)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(data))
    text = markdown(report)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    text = html_page(report, out, items, colours)
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(text))
