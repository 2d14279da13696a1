"""`bench --folds K --seeds N`: replicate columns, pooled per seed, mean and spread over seeds."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import fakes
import pytest
import torch
from test_bench import (  # noqa: F401  (the module fixture registers the fake domain)
    PRESETS,
    bench,
    registered,  # noqa: F401
)

from wsss_domains.errors import UserError
from wsss_domains.evaluation.report import EvaluationReport
from wsss_domains.transfer_matrix.presets import CellPreset
from wsss_domains.transfer_matrix.replicates import aggregate, expand, fold_pool

BASE = PRESETS[next(iter(PRESETS))]


def test_columns_cut_from_one_pool_are_folded_and_fixed_splits_repeat_over_seeds_only():
    pooled = replace(BASE, train_split="train[0:3]", score_split="train[3:]")
    assert fold_pool(pooled) == "train" and fold_pool(BASE) is None  # train / val: two splits
    expanded, replicates = expand({"a": pooled, "b": BASE}, ["a", "b"], folds=2, seeds=[0, 1])
    assert [r.name for r in replicates["a"]] == ["a#f1s0", "a#f2s0", "a#f1s1", "a#f2s1"]
    assert [r.name for r in replicates["b"]] == ["b#s0", "b#s1"]
    assert (
        expanded["a#f2s1"].train_split == "train[fold!=2/2]"
        and expanded["a#f2s1"].score_split == "train[fold=2/2]"
    )
    assert expanded["a#f2s1"].seed == 1 and expanded["b#s1"].train_split == BASE.train_split
    with pytest.raises(ValueError, match="at least one seed"):
        expand({"a": pooled}, ["a"], folds=2, seeds=[])


def test_stratified_replicates_have_their_own_names_and_stratified_splits():
    pooled = replace(BASE, train_split="train[0:3]", score_split="train[3:]")
    expanded, replicates = expand({"a": pooled, "b": BASE}, ["a", "b"], 2, [0], stratified=True)
    assert [r.name for r in replicates["a"]] == ["a#sf1s0", "a#sf2s0"]  # never an interleaved fold's cell
    assert [r.name for r in replicates["b"]] == ["b#s0"]
    assert expanded["a#sf2s0"].train_split == "train[fold!=2/2, stratified]"
    assert expanded["a#sf2s0"].score_split == "train[fold=2/2, stratified]"


def _cell(confusion: list[list[int]], seconds: float = 1.0, peak: int | None = 10**9) -> dict:
    report = EvaluationReport.from_confusion(torch.tensor(confusion), ("bg", "x"), [0, 1], n_images=2)
    return {"status": "ok", "evaluation": report.to_dict(), "train_seconds": seconds,
            "pseudo_label_seconds": seconds, "wall_seconds": 2 * seconds, "train_peak_rss_bytes": peak,
            "pseudo_label_peak_rss_bytes": peak, "peak_rss_bytes": peak, "peak_gpu_bytes": None}  # fmt: skip


def _miou(confusion: list[list[int]]) -> float:
    """mIoU by hand: TP / (TP + FP + FN) per class, averaged."""
    ious = []
    for c in range(2):
        tp = confusion[c][c]
        fp = sum(confusion[r][c] for r in range(2)) - tp
        fn = sum(confusion[c]) - tp
        ious.append(tp / (tp + fp + fn))
    return sum(ious) / 2


def test_cells_pool_the_folds_of_a_seed_then_average_over_seeds_with_paired_gains():
    _, replicates = expand(
        {"a": replace(BASE, train_split="train[0:3]", score_split="train[3:]")}, ["a"], 2, [0, 1]
    )
    cam = {
        "a#f1s0": [[8, 2], [1, 9]],
        "a#f2s0": [[5, 0], [3, 2]],
        "a#f1s1": [[9, 1], [0, 10]],
        "a#f2s1": [[4, 1], [1, 4]],
    }
    par = {
        "a#f1s0": [[9, 1], [1, 9]],
        "a#f2s0": [[5, 0], [1, 4]],
        "a#f1s1": [[9, 1], [2, 8]],
        "a#f2s1": [[5, 0], [1, 4]],
    }
    cells = {name: {"cam": _cell(cam[name]), "par": _cell(par[name], 3.0)} for name in cam}
    out = aggregate(cells, replicates, ["cam", "par"], "cam")["a"]

    def pooled(table: dict, seed: int) -> float:
        first, second = table[f"a#f1s{seed}"], table[f"a#f2s{seed}"]
        return _miou([[first[r][c] + second[r][c] for c in range(2)] for r in range(2)])

    cam_seeds, par_seeds = [pooled(cam, s) for s in (0, 1)], [pooled(par, s) for s in (0, 1)]
    assert out["cam"]["miou"] == pytest.approx(statistics.mean(cam_seeds))
    assert out["cam"]["miou_sd"] == pytest.approx(statistics.stdev(cam_seeds))
    gains = [p - c for p, c in zip(par_seeds, cam_seeds, strict=True)]
    assert out["par"]["gain_vs_cam"] == pytest.approx(statistics.mean(gains))
    assert out["par"]["gain_sd"] == pytest.approx(statistics.stdev(gains))
    assert out["par"]["wall_seconds"] == pytest.approx(6.0) and out["par"]["n_images"] == 4
    assert set(out["par"]["per_class_gain_vs_cam"]) == {"bg", "x"}
    assert out["par"]["peak_rss_bytes"] == 10**9 and out["par"]["peak_gpu_bytes"] is None
    cells["a#f1s1"]["par"]["peak_rss_bytes"] = 3 * 10**9  # the most any replicate needed
    assert aggregate(cells, replicates, ["cam", "par"], "cam")["a"]["par"]["peak_rss_bytes"] == 3 * 10**9
    cells["a#f2s0"]["par"]["peak_rss_bytes"] = None  # one unmeasured replicate: unknown
    assert aggregate(cells, replicates, ["cam", "par"], "cam")["a"]["par"]["peak_rss_bytes"] is None
    cells["a#f2s1"]["par"] = {"status": "failed", "error": "boom"}
    failed = aggregate(cells, replicates, ["cam", "par"], "cam")["a"]["par"]
    assert failed["status"] == "failed" and "1 of 4 replicates failed; a#f2s1: boom" in failed["error"]
    del cells["a#f2s1"]["par"]
    assert "par" not in aggregate(cells, replicates, ["cam", "par"], "cam")["a"]  # not finished yet


def test_bench_with_folds_and_seeds_runs_every_replicate_and_reports_mean_and_spread(tmp_path: Path):
    fakes.write_shapes(tmp_path / "data" / "shapes", n_train=4, n_val=2, n_unlabelled=0)
    column = next(iter(PRESETS))
    presets: dict[str, CellPreset] = {
        column: replace(BASE, train_split="train[0:3]", score_split="train[3:]")
    }
    out = tmp_path / "matrix"
    assert bench(out, tmp_path / "data", "par", "--folds", "2", "--seeds", "0,1", presets=presets) == 0
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert len(cells) == 8 and f"{column}#f2s1__par.json" in cells  # 2 folds x 2 seeds x (cam, par)
    matrix = json.loads((out / "matrix.json").read_text())
    cell = matrix["cells"][column]["par"]
    assert cell["status"] == "ok" and len(cell["replicates"]) == 4 and cell["miou_sd"] is not None
    assert "gain_sd" in cell and matrix["presets"][column]["folds"] == 2
    text = (out / "matrix.md").read_text()
    assert "±" in text and "2-fold cross-validation over `train`" in text and "seeds 0, 1" in text
    assert "--folds 2 --seeds 0,1" in matrix["command"]
    # a second run finds every replicate done
    assert bench(out, tmp_path / "data", "par", "--folds", "2", "--seeds", "0,1", presets=presets) == 0


def test_bench_with_stratified_folds_records_them(tmp_path: Path):
    fakes.write_shapes(tmp_path / "data" / "shapes", n_train=4, n_val=2, n_unlabelled=0)
    column = next(iter(PRESETS))
    presets = {column: replace(BASE, train_split="train[0:3]", score_split="train[3:]")}
    out = tmp_path / "matrix"
    with pytest.raises(UserError, match="--folds"):
        bench(out, tmp_path / "data", "cam", "--stratified", presets=presets)
    assert bench(out, tmp_path / "data", "cam", "--folds", "2", "--stratified", presets=presets) == 0
    assert sorted(p.name for p in (out / "cells").iterdir()) == [
        f"{column}#sf1s0__cam.json",
        f"{column}#sf2s0__cam.json",
    ]
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["presets"][column]["stratified"] is True and "--stratified" in matrix["command"]
    assert "2-fold cross-validation stratified by class over `train`" in (out / "matrix.md").read_text()
