"""Cross-validated cells: every column of the matrix repeated over K folds and N training seeds.

``bench --folds K --seeds 0,1`` turns each domain column into K x N replicate columns (their own
runs and cell files, resumable like any cell): fold k trains on every image of the column's pool
outside fold k and scores fold k (``train[fold!=k/K]`` / ``train[fold=k/K]``, see
:mod:`wsss_domains.data.splits`), with each seed. The pool is the split both of the column's slices
come from; a column whose training and scoring splits differ (CamVid's ``train`` / ``val``) keeps its
fixed pair and is repeated over seeds only. ``--stratified`` balances the folds by class instead of
interleaving them (``train[fold=k/K, stratified]``; replicates named ``sf<k>``, so cells of the two
kinds of folds never mix).

A column's cell is then, per seed, the mIoU of the confusion matrices summed over its folds (every
pooled image scored once, by a classifier that never saw it), and the matrix shows the mean over
seeds with its standard deviation; the gain over plain CAM is the mean of the per-seed paired
differences, with their spread, so a reader can tell a transfer effect from noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from wsss_domains.data.splits import fold_split, parse_split
from wsss_domains.evaluation.report import EvaluationReport
from wsss_domains.transfer_matrix.presets import CellPreset
from wsss_domains.transfer_matrix.report import per_class_gain

SEPARATOR = "#"  # replicate columns are named <column>#f<k>s<seed> (cell and run folder names)


@dataclass(frozen=True)
class Replicate:
    column: str
    name: str  # the replicate's own column name
    fold: int | None  # None: the column's fixed split
    seed: int


def fold_pool(preset: CellPreset) -> str | None:
    """The split both slices of ``preset`` are cut from, or None where they are different splits."""
    train, score = parse_split(preset.train_split), parse_split(preset.score_split)
    return train.base if train.base == score.base else None


def expand(
    presets: Mapping[str, CellPreset],
    columns: Sequence[str],
    folds: int,
    seeds: Sequence[int],
    stratified: bool = False,
) -> tuple[dict[str, CellPreset], dict[str, list[Replicate]]]:
    """Replicate presets (name -> preset) and, per column, its replicates in run order.

    ``stratified``: folds balanced by class rather than interleaved by sorted id.
    """
    if folds < 1 or not seeds:
        raise ValueError(f"need folds >= 1 and at least one seed, got {folds} and {list(seeds)}")
    expanded: dict[str, CellPreset] = {}
    replicates: dict[str, list[Replicate]] = {}
    for column in columns:
        preset = presets[column]
        pool = fold_pool(preset) if folds > 1 else None
        replicates[column] = []
        for seed in seeds:
            for fold in range(1, folds + 1) if pool is not None else [None]:
                kind = "sf" if stratified else "f"
                name = f"{column}{SEPARATOR}" + (f"{kind}{fold}" if fold is not None else "") + f"s{seed}"
                splits = {}
                if fold is not None:
                    splits = {
                        "train_split": fold_split(pool, fold, folds, complement=True, stratified=stratified),
                        "score_split": fold_split(pool, fold, folds, stratified=stratified),
                    }
                expanded[name] = replace(preset, seed=seed, **splits)
                replicates[column].append(Replicate(column, name, fold, seed))
    return expanded, replicates


def _pooled(evaluations: Sequence[Mapping[str, Any]]) -> EvaluationReport:
    """One report of confusion matrices summed over ``evaluations`` (the same classes and scoring)."""
    first = evaluations[0]
    classes = list(first["classes"])
    scored = [classes.index(name) for name in first["per_class_iou"]]
    confusion = sum(torch.tensor(ev["confusion"], dtype=torch.long) for ev in evaluations)
    unassigned = sum(torch.tensor(ev["unassigned"], dtype=torch.long) for ev in evaluations)
    return EvaluationReport.from_confusion(
        confusion,  # type: ignore[arg-type]
        classes,
        scored,
        unassigned=unassigned,  # type: ignore[arg-type]
        n_images=sum(int(ev["n_images"]) for ev in evaluations),
    )


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; None where a value is undefined (NaN: nothing scored)."""
    if any(math.isnan(v) for v in values):
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _per_seed(cells: Mapping[str, Any], replicates: Sequence[Replicate]) -> dict[int, EvaluationReport]:
    seeds = sorted({r.seed for r in replicates})
    return {s: _pooled([cells[r.name]["evaluation"] for r in replicates if r.seed == s]) for s in seeds}


PEAK_KEYS = ("train_peak_rss_bytes", "pseudo_label_peak_rss_bytes", "peak_rss_bytes", "peak_gpu_bytes")


def _largest(values: Iterable[int | None]) -> int | None:
    given = list(values)
    known = [v for v in given if v is not None]
    return max(known) if known and len(known) == len(given) else None


def aggregate(
    cells: Mapping[str, Mapping[str, Mapping[str, Any]]],
    replicates: Mapping[str, Sequence[Replicate]],
    methods: Sequence[str],
    baseline: str,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Column -> method -> one cell: pooled over folds per seed, mean and spread over seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for column, reps in replicates.items():
        out[column] = {}
        base_reports: dict[int, EvaluationReport] | None = None
        for method in [baseline, *(m for m in methods if m != baseline)]:
            found = [cells.get(r.name, {}).get(method) for r in reps]
            if any(cell is None for cell in found):
                continue  # not run yet
            failed = [(r, c) for r, c in zip(reps, found, strict=True) if c["status"] != "ok"]
            if failed:
                out[column][method] = {
                    "domain": column,
                    "method": method,
                    "status": "failed",
                    "error": f"{len(failed)} of {len(reps)} replicates failed; {failed[0][0].name}: {failed[0][1]['error']}",
                    "weights_missing": all(c.get("weights_missing") for _, c in failed),
                }
                continue
            by_seed = _per_seed({r.name: c for r, c in zip(reps, found, strict=True)}, reps)
            if method == baseline:
                base_reports = by_seed
            miou, miou_sd = _mean_sd([report.miou for report in by_seed.values()])
            names = list(next(iter(by_seed.values())).per_class_iou)
            cell: dict[str, Any] = {
                "domain": column,
                "method": method,
                "status": "ok",
                "miou": miou,
                "miou_sd": miou_sd,
                "miou_per_seed": {str(s): _mean_sd([report.miou])[0] for s, report in by_seed.items()},
                "per_class_iou": {
                    n: _mean_sd([r.per_class_iou[n] for r in by_seed.values()])[0] for n in names
                },
                "replicates": [r.name for r in reps],
                "n_images": next(iter(by_seed.values())).n_images,
                **{
                    key: statistics.mean(float(c[key]) for c in found)
                    for key in ("train_seconds", "pseudo_label_seconds", "wall_seconds")
                },
                # Peak memory: the most any replicate needed (unknown if one went unmeasured).
                **{key: _largest(c.get(key) for c in found) for key in PEAK_KEYS},
                "trained_with": found[0].get("trained_with"),
                "evaluation": _pooled([c["evaluation"] for c in found]).to_dict(),
            }
            paired = base_reports is not None and base_reports.keys() == by_seed.keys()
            if paired and method != baseline and miou is not None:
                gains = [by_seed[s].miou - base_reports[s].miou for s in by_seed]  # type: ignore[index]
                cell["gain_vs_cam"], cell["gain_sd"] = _mean_sd(gains)
            if method != baseline:
                cell["per_class_gain_vs_cam"] = per_class_gain(cell, out[column].get(baseline))
            out[column][method] = cell
    return out
