"""Held-out quality of the whole job: k-fold cross-validation over the development images, seeds.

For every fold and seed, ``wsss-domains run`` (the Python API: :func:`run_pipeline`) trains the
classifier, fits the domain's recommended refinement and trains the segmenter on the other folds
only, then segments the held-out fold without any label. Recorded per run and as mean and spread
over all runs: pseudo-labels of the training images (labels given), pseudo-labels of the held-out
images (labels given), the classifier pipeline on the held-out images with its own predicted labels
(no labels) and the segmenter on the held-out images (no labels), with the machine's load beside
them (time-budgeted training does less work on a busy machine).

    python benchmarks/heldout.py --preset histo --seeds 0,1        # 4 interleaved folds of 31 ROIs
    python benchmarks/heldout.py --preset deepglobe --seeds 0,1 --stratified  # 2 folds of 8 scenes, by class
    python benchmarks/heldout.py --preset camvid --seeds 0,1          # CamVid's own train / val split
    python benchmarks/heldout.py --preset histo --seeds 0,1 --extra-train-split training  # + 1.training patches

A finished run (its ``report.json``) is reused when the script is re-run; ``--fresh`` recomputes.

Under a wall-clock budget the number of optimiser steps, and so the result, depends on the machine
and its load: the same seed re-run differs. ``--classifier-steps`` / ``--segmenter-steps`` budget a
stage in steps instead (its minutes then no longer apply), so a seed's run is repeatable; choose
steps that fit the minutes on the machine at hand (the records give the steps that 15 minutes
bought).

    python benchmarks/heldout.py --preset camvid --seeds 0,1 --classifier-steps 300 --segmenter-steps 1700

``--balance-classes T`` draws the training images of rare classes more often, in both stages or,
with ``--balance-stages classifier`` (or ``segmenter``), in one; a stage it does not name follows the
domain's recipe (the driving recipe balances the classifier; ``--balance-classes 0``: uniform).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from wsss_domains.reports.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "heldout.md"


@dataclass(frozen=True)
class Preset:
    domain: str
    dataset: str
    path: str  # below the data root
    split: str  # the split folds are cut from (or the training split with a fixed test split)
    test_split: str | None = None  # a fixed test split: no folds
    patch_size: int | None = None
    folds: int = 3
    note: str = ""


PRESETS = {
    # 4 folds: only ROIs 02, 05, 08 and 09 hold normal tissue; every training set keeps two of them.
    "histo": Preset("histo", "wsss4luad", "histo/WSSS4LUAD", "validation", patch_size=224, folds=4,
                    note="WSSS4LUAD 2.validation: 31 annotated ROIs, tumour / stroma / normal"),
    "deepglobe": Preset("remote-sensing", "deepglobe", "remote_sensing/deepglobe-sample", "train",
                        patch_size=256, folds=2, note="DeepGlobe land cover: 8 scenes of 2448x2448"),
    "camvid": Preset("driving", "camvid", "driving/CamVid", "train", test_split="val",
                     note="CamVid: train 367 frames, val 101 frames of other sequences"),
}  # fmt: skip

STAGES = (
    ("pseudo-labels (training split, labels given)", "PL train (labels)"),
    ("pseudo-labels (test split, labels given)", "PL held-out (labels)"),
    ("pseudo-labels (test split, predicted labels: no labels)", "CAM pipeline held-out (no labels)"),
    ("segmentation (test split, no labels)", "segmenter held-out (no labels)"),
)
SEGMENTER = STAGES[3][0]
STRATIFIED_HELP = (
    "folds balanced by class ('[fold=i/k, stratified]', jobs named sfold<i>) instead of interleaved by "
    "sorted id: for a few large images where a class lives in one or two (DeepGlobe's forest and water)"
)


def add_label_free_stage(
    job: Path, report: dict, domain: str, dataset: str, data: Path, test_split: str
) -> None:
    """Score the classifier pipeline with predicted labels on a run recorded before that stage existed."""
    from wsss_domains.cam.settings import CamSettings
    from wsss_domains.pipeline.run import LABEL_FREE_STAGE, label_free_pseudo_labels
    from wsss_domains.training.run import RunConfig

    config = RunConfig.load(job / "classifier")
    patch = config.patch_size
    recipe = report["recipe"]
    common = dict(method_name=recipe["method"], options=recipe["method_options"], cam=CamSettings(cam_norm=recipe["cam_norm"]),
                  device="cpu", runtime="auto",
                  dataset_options={"labels_from_masks": True, "patch_size": tuple(patch)} if patch else None)  # fmt: skip
    out = job / "pseudo-labels" / "test-predicted-labels"
    start = time.perf_counter()
    scored = label_free_pseudo_labels(job / "classifier", domain, dataset, data, test_split, out, common)
    report["stages"].append({"name": LABEL_FREE_STAGE, "folder": str(out), "evaluation": scored.report.to_dict(),
                             "seconds": round(time.perf_counter() - start, 1), "note": "added afterwards"})  # fmt: skip
    (job / "report.json").write_text(json.dumps(report, indent=2, default=str))


def splits(
    preset: Preset, folds: int, stratified: bool = False, extra_train: str | None = None
) -> list[tuple[str, str, str]]:
    """(name, train split, test split) of every fold; ``stratified``: folds balanced by class;
    ``extra_train``: a split joined to every training split (``... + training``), never scored."""
    join = (lambda split: f"{split} + {extra_train}") if extra_train else (lambda split: split)
    if preset.test_split is not None:
        return [("fixed", join(preset.split), preset.test_split)]
    from wsss_domains.data.splits import fold_split

    kind = "sfold" if stratified else "fold"
    return [
        (
            f"{kind}{f}",
            join(fold_split(preset.split, f, folds, complement=True, stratified=stratified)),
            fold_split(preset.split, f, folds, stratified=stratified),
        )
        for f in range(1, folds + 1)
    ]


def comparison_lines(rows: list[dict], columns: tuple[tuple[str, str], ...], preset: Preset) -> list[str]:
    """A markdown table of ``columns`` (stage, heading) per fold and seed, its load column and the pooled row."""
    lines = [
        "\n| fold | seed | " + " | ".join(short for _, short in columns) + " | load at start |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for r in rows:
        cells = [f"{r['scores'][s]['miou']:.4f}" if s in r["scores"] else "n/a" for s, _ in columns]
        lines.append(f"| {r['fold']} | {r['seed']} | " + " | ".join(cells) + f" | {r['load'][0]:.2f} |")
    pooled = {stage: pooled_miou(rows, stage, preset) for stage, _ in columns}
    lines.append(
        "| **pooled over folds, mean ± sd over seeds** | | "
        + " | ".join(f"**{mean_spread(pooled[s])}**" for s, _ in columns)
        + " | |"
    )
    return lines


def pooled_miou(rows: list[dict], stage: str, preset: Preset) -> list[float]:
    """Per seed: the mIoU of the confusion matrices of ``stage`` summed over that seed's folds."""
    import torch

    from wsss_domains.domains import create_domain
    from wsss_domains.evaluation.report import EvaluationReport

    domain = create_domain(preset.domain)
    space = domain.dataset(preset.dataset).label_space
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        found = [r["scores"][stage] for r in rows if r["seed"] == seed and stage in r["scores"]]
        if not found:
            continue
        confusion = sum(torch.tensor(ev["confusion"]) for ev in found)
        unassigned = sum(torch.tensor(ev["unassigned"]) for ev in found)
        report = EvaluationReport.from_confusion(
            confusion, space.classes, domain.scored_classes(space), unassigned=unassigned
        )
        out.append(report.miou)
    return out


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a script that revisits finished held-out jobs (which preset, where, which folds and seeds)."""
    p.add_argument("--preset", choices=tuple(PRESETS), required=True)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--jobs", type=Path, help="heldout.py's output folder (default: runs/heldout-<preset>)")
    p.add_argument("--folds", type=int, help="number of folds (default: the preset's)")
    p.add_argument("--stratified", action="store_true", help=STRATIFIED_HELP)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--only", help="comma-separated fold names to run (e.g. fold1)")
    p.add_argument("--no-record", action="store_true")


def add_method_option_argument(p: argparse.ArgumentParser, example: str) -> None:
    """``--method-option KEY=VALUE``, repeatable, as ``pseudo-labels`` takes it; read by :func:`method_options`."""
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"an option of the compared method, repeatable (pseudo-labels --method-option), e.g. {example}",
    )


def method_options(args: argparse.Namespace) -> dict[str, object]:
    """The ``--method-option`` values, parsed, in the order given."""
    from wsss_domains.cli.common import key_values

    return key_values(args.method_option, "--method-option")


def options_suffix(options: dict[str, object], sep: str = "-") -> str:
    """``options`` in a folder name (``-key=value`` each) or, with ``sep=" "``, in a record's column."""
    return "".join(f"{sep}{key}={value}" for key, value in options.items())


def jobs_folder(args: argparse.Namespace) -> Path:
    return args.jobs or ROOT / "runs" / f"heldout-{args.preset}"


def finished_jobs(args: argparse.Namespace) -> Iterator[tuple[str, str, str, int, Path, dict]]:
    """(fold name, train split, test split, seed, job folder, its report) of every finished job chosen by
    :func:`add_job_arguments`'s options; exits with a hint where a job has not run."""
    preset = PRESETS[args.preset]
    jobs = jobs_folder(args)
    chosen = splits(preset, args.folds or preset.folds, args.stratified)
    if args.only:
        chosen = [c for c in chosen if c[0] in args.only.split(",")]
    for name, train, test in chosen:
        for seed in (int(s) for s in args.seeds.split(",")):
            job = jobs / f"{name}-seed{seed}"
            if not (job / "report.json").is_file():
                sys.exit(f"{job}: no finished heldout.py job here; run heldout.py first (or name --jobs)")
            report = json.loads((job / "report.json").read_text())
            # The job's own training split: it may hold a split joined by --extra-train-split.
            yield name, report.get("train_split", train), test, seed, job, report


def cached_comparison(out: Path, compute: Callable[[], dict]) -> dict:
    """A comparison on one job: ``out/report.json`` where an earlier invocation finished it, else
    ``compute()``'s result with its wall time and the load at its start (time-budgeted training
    does less on a busy machine), saved there."""
    done = out / "report.json"
    if done.is_file():
        return json.loads(done.read_text())
    load = list(os.getloadavg())
    start = time.perf_counter()
    result = {
        **compute(),
        "seconds": round(time.perf_counter() - start, 1),
        "load_at_start": load,
        "cpu": cpu_model(),
    }
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2, default=str))
    return result


def dataset_options(job: Path) -> dict:
    """The loader options the job's classifier trained with (tiles scored against their masks)."""
    from wsss_domains.training.run import RunConfig

    config = RunConfig.load(job / "classifier")
    patch = config.patch_size
    return (
        {"labels_from_masks": True, "patch_size": tuple(patch)} if config.labels_from_masks and patch else {}
    )


def section_head(heading: str, description: str, load_before: tuple[float, ...], started: float) -> list[str]:
    """A record section's heading (with the time) and its description, followed by the machine, its load
    before the work and the wall time since ``started`` (``time.perf_counter()``). The CPU's model is
    named because a time-budgeted run trains further on a faster one."""
    return [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {heading}",
        f"\n{description}; {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}); load average (1 min) before "
        f"{load_before[0]:.2f}; {(time.perf_counter() - started) / 60:.0f} min wall.",
    ]


def record(path: Path, title: str, lines: list[str], no_record: bool) -> None:
    """Print a record section (``lines`` plus the command that made it) and append it to ``path``
    (created with ``title``) unless ``no_record``."""
    lines = [*lines, "\nCommand:\n", "```", shlex.join([Path(sys.executable).name, *sys.argv]), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if no_record:
        return
    if not path.exists():
        path.write_text(f"# {title}\n")
    with path.open("a") as fh:
        fh.write(text)


def mean_spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def balance_for(stage: str, args: argparse.Namespace) -> float | None:
    """``--balance-classes`` where ``--balance-stages`` names ``stage`` (or both), else None (the
    recipe's)."""
    return args.balance_classes if args.balance_stages in ("both", stage) else None


def balance_text(rows: list[dict]) -> str:
    """How the runs sampled their training images, as their reports record it (a recipe may balance)."""
    stages = []
    for stage in ("classifier", "segmenter"):
        chosen = sorted({r["balance"][stage] or 0.0 for r in rows})
        if any(chosen):
            stages.append(f"{stage} T = {' / '.join(f'{t:g}' for t in chosen)}")
    return f", classes balanced (repeat factors; {', '.join(stages)})" if stages else ""


def stage_budget(minutes: float, steps: int | None) -> dict:
    """A stage's training budget: ``steps`` optimiser steps where given (the minutes then do not
    apply, so the seed fixes the run), else ``minutes`` of wall-clock time."""
    if steps is None:
        return {"max_minutes": minutes}
    if steps < 1:
        raise SystemExit(f"a step budget must be positive, got {steps}")
    return {"max_minutes": None, "max_steps": steps}


def budget_text(minutes: float, steps: int | None) -> str:
    """How a stage's budget reads in a record."""
    return f"{minutes:g} min" if steps is None else f"{steps} steps"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), required=True)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--folds", type=int, help="number of folds (default: the preset's)")
    p.add_argument("--stratified", action="store_true", help=STRATIFIED_HELP)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--classifier-minutes", type=float, default=15.0)
    p.add_argument("--segmenter-minutes", type=float, default=15.0)
    p.add_argument(
        "--classifier-steps",
        type=int,
        help="budget the classifier in optimiser steps instead of minutes (repeatable seeds)",
    )
    p.add_argument(
        "--segmenter-steps",
        type=int,
        help="budget the segmenter in optimiser steps (per round) instead of minutes (repeatable seeds)",
    )
    p.add_argument("--method", help="pseudo-labelling method (default: the domain's recipe)")
    p.add_argument(
        "--seg-training", default="cross-entropy", help="segmenter training: cross-entropy, beco or carb"
    )
    p.add_argument(
        "--seg-rounds",
        type=int,
        default=1,
        help="segmenter self-training rounds, each trained for --segmenter-minutes (see segment --seg-rounds)",
    )
    p.add_argument(
        "--balance-classes",
        type=float,
        metavar="T",
        help="draw training images of rare classes more often (train/segment --balance-classes T), in the"
        " stages --balance-stages names (0: uniform; default: the domain's recipe)",
    )
    p.add_argument(
        "--balance-stages",
        choices=("both", "classifier", "segmenter"),
        default="both",
        help="which stage --balance-classes applies to (default: both)",
    )
    p.add_argument(
        "--domain-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the preset's domain plugin for every stage, repeatable (run --domain-option), "
        "e.g. stain=macenko for histo",
    )
    p.add_argument("--only", help="comma-separated fold names to run (e.g. fold1), for splitting the work")
    p.add_argument(
        "--extra-train-split",
        metavar="SPLIT",
        help="a split of the same dataset joined to every fold's training split and never scored, e.g. "
        "training (WSSS4LUAD's training patches, labels in their file names: the challenge's own format)",
    )
    p.add_argument("--out", type=Path, help="default: runs/heldout-<preset>")
    p.add_argument("--fresh", action="store_true", help="recompute finished runs")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    from wsss_domains.cli.common import key_values
    from wsss_domains.pipeline.classifier import ClassifierSettings
    from wsss_domains.pipeline.run import RunSettings, run_pipeline
    from wsss_domains.pipeline.segmenter import SegmenterSettings
    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    domain_options = key_values(args.domain_option, "--domain-option")
    data = args.data_root / preset.path
    out = args.out or ROOT / "runs" / f"heldout-{args.preset}"
    seeds = [int(s) for s in args.seeds.split(",")]
    args.folds = args.folds or preset.folds
    chosen = splits(preset, args.folds, args.stratified, args.extra_train_split)
    if args.only:
        chosen = [c for c in chosen if c[0] in args.only.split(",")]
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, train_split, test_split in chosen:
        for seed in seeds:
            job = out / f"{name}-seed{seed}"
            if args.fresh:
                shutil.rmtree(job, ignore_errors=True)
            report_path = job / "report.json"
            reused = report_path.is_file()
            load = os.getloadavg()
            if not reused:
                settings = RunSettings(
                    classifier=ClassifierSettings(
                        labels_from_masks=True,
                        patch_size=preset.patch_size,
                        **stage_budget(args.classifier_minutes, args.classifier_steps),
                        seed=seed,
                        balance_classes=balance_for("classifier", args),
                        device="cpu",
                    ),
                    segmenter=SegmenterSettings(
                        **stage_budget(args.segmenter_minutes, args.segmenter_steps),
                        seed=seed,
                        training=args.seg_training,
                        rounds=args.seg_rounds,
                        balance_classes=balance_for("segmenter", args),
                    ),
                    method=args.method,
                )
                with progress_bars(False):  # the log lines are the record
                    run_pipeline(preset.domain, data, job, train_split=train_split, test_split=test_split,
                                 dataset=preset.dataset, settings=settings, domain_options=domain_options)  # fmt: skip
            report = json.loads(report_path.read_text())
            if report.get("train_split", train_split) != train_split:
                raise SystemExit(f"{job} trained on '{report['train_split']}', not '{train_split}': "
                                 "give another --out")  # fmt: skip
            if report["settings"].get("domain_options", {}) != domain_options:
                raise SystemExit(f"{job} ran with domain options {report['settings'].get('domain_options')}, "
                                 f"not {domain_options}: give another --out")  # fmt: skip
            if not reused:  # the load while the run trained, kept for later invocations that reuse it
                report["load_at_start"] = list(load)
                report_path.write_text(json.dumps(report, indent=2, default=str))
            load = tuple(report.get("load_at_start", load))
            if not any(s["name"] == STAGES[2][0] for s in report["stages"]):
                add_label_free_stage(job, report, preset.domain, preset.dataset, data, test_split)
            scores = {s["name"]: s["evaluation"] for s in report["stages"] if s.get("evaluation")}
            seconds = {s["name"]: s["seconds"] for s in report["stages"]}
            rows.append({"fold": name, "seed": seed, "train": train_split, "test": test_split,
                         "scores": scores, "seconds": seconds, "method": report["recipe"]["method"],
                         "reused": reused, "load": load, "balance": {
                             stage: report["settings"][stage].get("balance_classes")
                             for stage in ("classifier", "segmenter")},
                         "cpus": report.get("environment", {}).get("CPUs", "not recorded")})  # fmt: skip
            print(f"{name} seed {seed}: " + ", ".join(
                f"{short} {scores[stage]['miou']:.4f}" for stage, short in STAGES if stage in scores
            ), flush=True)  # fmt: skip
    load_after = os.getloadavg()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    classifier_budget = budget_text(args.classifier_minutes, args.classifier_steps)
    segmenter_budget = budget_text(args.segmenter_minutes, args.segmenter_steps)
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {args.preset}: "
        + (
            f"{args.folds}-fold" + (" stratified" if args.stratified else "")
            if preset.test_split is None
            else f"`{preset.split}` -> `{preset.test_split}`"
        )
        + (f", training split joined with `{args.extra_train_split}`" if args.extra_train_split else "")
        + f", seeds {args.seeds}",
        f"\n{preset.note}. Classifier {classifier_budget} + segmenter {segmenter_budget} per run"
        f"{f' and round ({args.seg_rounds} rounds)' if args.seg_rounds > 1 else ''}, method "
        f"`{rows[0]['method'] if rows else '?'}`, segmenter training `{args.seg_training}`"
        + "".join(f", domain option `{key}={value}`" for key, value in domain_options.items())
        + balance_text(rows)
        + f"; {platform.machine()}, CPUs of the runs: {' / '.join(sorted({r['cpus'] for r in rows}))}"
        f"; load average (1 min) before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f}; {(time.perf_counter() - started) / 60:.0f} min wall"
        + (" (some runs reused from an earlier invocation)" if any(r["reused"] for r in rows) else "")
        + ".",
        "\n| fold | seed | " + " | ".join(short for _, short in STAGES) + " | load at start |",
        "|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for r in rows:
        cells = [
            f"{r['scores'][stage]['miou']:.4f}" if stage in r["scores"] else "n/a" for stage, _ in STAGES
        ]
        lines.append(f"| {r['fold']} | {r['seed']} | " + " | ".join(cells) + f" | {r['load'][0]:.2f} |")
    summary = [
        mean_spread([r["scores"][stage]["miou"] for r in rows if stage in r["scores"]]) for stage, _ in STAGES
    ]
    lines.append("| **mean ± sd over runs** | | " + " | ".join(f"**{s}**" for s in summary) + " | |")
    pooled = {stage: pooled_miou(rows, stage, preset) for stage, _ in STAGES}
    lines.append(
        "| **pooled over folds, mean ± sd over seeds** | | "
        + " | ".join(f"**{mean_spread(pooled[stage])}**" for stage, _ in STAGES)
        + " | |"
    )
    lines.append(
        "\nPooled: one confusion matrix summed over the held-out folds of a seed (every development image scored "
        "once, by models that never saw it), its mIoU, then mean and spread over seeds. Per run, a class "
        "absent from a fold's ground truth but predicted there counts with IoU 0, which weighs heavily on "
        "small folds; pooling removes that."
    )
    classes = []
    for r in rows:
        for stage in r["scores"].values():
            classes = list(stage["per_class_iou"])
            break
        if classes:
            break
    if classes:
        lines += ["\nPer-class IoU of the segmenter on held-out images (mean over runs):\n",
                  "| " + " | ".join(classes) + " |", "|" + "---|" * len(classes)]  # fmt: skip
        seg = [r["scores"][SEGMENTER]["per_class_iou"] for r in rows if SEGMENTER in r["scores"]]
        lines.append("| " + " | ".join(
            mean_spread([v[c] for v in seg if v.get(c) is not None]) for c in classes
        ) + " |")  # fmt: skip
    lines += ["\nCommand:\n", "```", command, "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text(
                "# Held-out benchmarks: the whole job (classifier, pseudo-labels, segmenter) by k-fold "
                "cross-validation\n"
            )
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
