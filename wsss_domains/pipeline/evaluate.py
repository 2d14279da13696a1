"""Scoring a folder of label PNGs (pseudo-labels or segmenter predictions) against a split's masks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from wsss_domains.data.io import atomic_write
from wsss_domains.evaluation import EvaluationReport, evaluate_predictions
from wsss_domains.pipeline.data import open_dataset


def evaluate_split(
    domain: str,
    dataset: str | None,
    data: Path,
    split: str | None,
    pred: Path,
    progress: bool = True,
    dataset_options: Mapping[str, object] | None = None,
    *,
    domain_options: Mapping[str, object] | None = None,
) -> EvaluationReport:
    """``dataset_options`` must match the ones the predictions were written with (same sample ids);
    ``domain_options`` build the domain plugin (whose exclude masks and metrics score the split)."""
    opened = open_dataset(
        domain, dataset, data, split, domain_options=domain_options, **(dataset_options or {})
    )
    return evaluate_predictions(opened.domain, opened.label_space, opened.dataset, pred, progress=progress)


def write_report(report: EvaluationReport, json_path: Path | None, plot_path: Path | None) -> None:
    """The report as JSON and as a per-class bar chart, each where a path is given."""
    if json_path is not None:
        text = report.to_json()
        atomic_write(json_path, lambda tmp: tmp.write_text(text))
    if plot_path is not None:
        report.plot_per_class(plot_path)
