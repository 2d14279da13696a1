"""Cross-architecture consistency against CAM fusion, by k-fold cross-validation, at equal budget.

For every fold and seed, three classifiers train on the other folds: EfficientNet-Lite0 (plain CAM)
and EfficientNet-Lite2 (plain CAM) for ``--minutes`` each, and ``cross-arch`` (Lite0 with Lite2 as its
second architecture, trained together) for twice that, the training compute the fusions spend. The held-out fold is then
pseudo-labelled with its image-level labels by each classifier alone, by ORANDNet's AND and OR
fusions and the precision-weighted fusion of the two independent runs (``cam-fusion``), and by
``cross-arch``'s fused CAMs and its Lite0 branch alone. Per seed the held-out folds' confusion matrices
are summed (every image scored once), then mean and spread over seeds.

    python benchmarks/cross_architecture.py --preset histo --seeds 0,1 --minutes 3

Finished runs and pseudo-label folders are reused when the script is re-run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from heldout import DATA_ROOT, PRESETS, ROOT, splits

RESULTS = ROOT / "benchmarks" / "results" / "cross_architecture.md"
SECOND = "tf_efficientnet_lite2"
ROWS = (  # (row, folder, classifier run, method, options); "{B}" stands for the Lite2 run's folder
    ("cam, Lite0", "cam-lite0", "lite0", "cam", {}),
    ("cam, Lite2", "cam-lite2", "lite2", "cam", {}),
    ("cam-fusion AND (Lite0, Lite2)", "fusion-and", "lite0", "cam-fusion", {"second_run": "{B}", "fusion": "and"}),
    ("cam-fusion OR (Lite0, Lite2)", "fusion-or", "lite0", "cam-fusion", {"second_run": "{B}", "fusion": "or"}),
    ("cam-fusion precision (Lite0, Lite2)", "fusion-precision", "lite0", "cam-fusion",
     {"second_run": "{B}", "fusion": "precision"}),
    ("cross-arch, fused CAMs", "cross-arch-fused", "cross", "cross-arch", {"second_backbone": SECOND, "cams": "fused"}),
    ("cross-arch, its Lite0 branch", "cross-arch-first", "cross", "cross-arch",
     {"second_backbone": SECOND, "cams": "first"}),
)  # fmt: skip
# (backbone, method, options, budget in units of --minutes): cross-arch trains both architectures in
# one run, so it gets the two independent runs' total, the training compute the fusions spend.
RUNS = {"lite0": ("tf_efficientnet_lite0", "cam", {}, 1),
        "lite2": (SECOND, "cam", {}, 1),
        "cross": ("tf_efficientnet_lite0", "cross-arch", {"second_backbone": SECOND}, 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("histo", "deepglobe"), default="histo")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget of each classifier")
    p.add_argument("--only", help="comma-separated fold names to run (e.g. fold1)")
    p.add_argument("--out", type=Path, help="default: runs/cross-architecture-<preset>")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    import torch

    from wsss_domains.cam.settings import CamSettings
    from wsss_domains.domains import create_domain
    from wsss_domains.evaluation.report import EvaluationReport
    from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier
    from wsss_domains.pipeline.pseudo_labels import pseudo_label_and_score
    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    out = args.out or ROOT / "runs" / f"cross-architecture-{args.preset}"
    seeds = [int(s) for s in args.seeds.split(",")]
    domain = create_domain(preset.domain)
    space = domain.dataset(preset.dataset).label_space
    scored: dict[tuple[str, int], list] = {}
    seconds: dict[str, list[float]] = {}
    loads = []
    started = time.perf_counter()
    load_before = os.getloadavg()
    chosen = splits(preset, preset.folds)
    if args.only:
        chosen = [c for c in chosen if c[0] in args.only.split(",")]
    for fold, train_split, test_split in chosen:
        for seed in seeds:
            job = out / f"{fold}-seed{seed}"
            loads.append(os.getloadavg()[0])
            for key, (backbone, method, options, units) in RUNS.items():
                settings = ClassifierSettings(backbone=backbone, method=method, method_options=dict(options),
                                              labels_from_masks=True, patch_size=preset.patch_size,
                                              max_minutes=units * args.minutes, seed=seed, device="cpu")  # fmt: skip
                start = time.perf_counter()
                with progress_bars(False):
                    train_classifier(preset.domain, data, job / key, split=train_split, dataset=preset.dataset,
                                     settings=settings)  # fmt: skip
                seconds.setdefault(f"train {key}", []).append(time.perf_counter() - start)
            for row, slug, key, method, options in ROWS:
                options = {k: str(job / "lite2") if v == "{B}" else v for k, v in options.items()}
                folder = job / "pseudo-labels" / slug
                start = time.perf_counter()
                with progress_bars(False):
                    result = pseudo_label_and_score(job / key, preset.domain, preset.dataset, data, test_split,
                                                    folder, labels_from_masks=True, score=True, method_name=method,
                                                    options=options, cam=CamSettings(), overlays=False,
                                                    device="cpu")  # fmt: skip
                seconds.setdefault(row, []).append(time.perf_counter() - start)
                scored.setdefault((row, seed), []).append(result.report)
                print(f"{fold} seed {seed} {row}: {result.report.miou:.4f}", flush=True)

    def pooled(row: str, seed: int) -> EvaluationReport:
        reports = scored[(row, seed)]
        confusion = sum(torch.as_tensor(r.confusion) for r in reports)
        unassigned = sum(torch.as_tensor(r.unassigned) for r in reports)
        return EvaluationReport.from_confusion(
            confusion, space.classes, domain.scored_classes(space), unassigned=unassigned
        )

    def spread(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    base = ROWS[0][0]
    names = [space.classes[c] for c in domain.scored_classes(space)]
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {args.preset}: {preset.folds}-fold, seeds {args.seeds}, "
        f"{args.minutes:g} CPU min per classifier",
        f"\n{preset.note}. Held-out folds pseudo-labelled whole, with their image-level labels. {platform.machine()}, "
        f"{os.cpu_count()} cores; load average (1 min) before {load_before[0]:.2f}, at each fold's start "
        f"{', '.join(f'{v:.2f}' for v in loads)}, after {os.getloadavg()[0]:.2f}; "
        f"{(time.perf_counter() - started) / 60:.0f} min wall.",
        "",
        "| method | mIoU (%) pooled, mean ± sd over seeds | gain over cam Lite0 | "
        + " | ".join(names)
        + " | seconds (PL per fold) |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row, *_ in ROWS:
        per_seed = [pooled(row, s) for s in seeds]
        gains = [100 * (pooled(row, s).miou - pooled(base, s).miou) for s in seeds]
        per_class = [
            spread([100 * r.per_class_iou[name] for r in per_seed]) for name in names
        ]  # fmt: skip
        lines.append(
            f"| {row} | {spread([100 * r.miou for r in per_seed])} | "
            + ("(base)" if row == base else f"{spread(gains)}")
            + " | "
            + " | ".join(per_class)
            + f" | {statistics.mean(seconds[row]):.0f} |"
        )
    train_times = ", ".join(
        f"{k}: {statistics.mean(v):.0f} s" for k, v in seconds.items() if k.startswith("train")
    )
    lines += [
        "",
        f"Training wall time per run (mean): {train_times}. The fusions use two trained classifiers (twice "
        "the training compute of one run); cross-arch trains both architectures in one run given their total "
        f"({2 * args.minutes:g} min).",
        "",
        "Command:",
        "",
        "```",
        shlex.join(["python", "benchmarks/cross_architecture.py", *sys.argv[1:]]),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text(
                "# Cross-architecture consistency against CAM fusion (k-fold cross-validation)\n"
            )
        with RESULTS.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
