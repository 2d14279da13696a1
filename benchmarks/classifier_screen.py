"""Classifier options screened cheaply: each variant's classifier pseudo-labels part of its own training split.

A held-out job costs about an hour per seed on CamVid, most of it pseudo-labelling every training
crop and training the segmenter. A classifier option (class-balanced sampling, pooling, backbone,
output stride, ...) acts on the pseudo-labels first, so a screen trains one classifier per variant
and seed on the preset's training split (a step budget: the seed fixes the run), pseudo-labels one
fold of K of that split (every K-th image by sorted id) with its image-level labels and the
domain's recipe (method, CAM normalisation and scales, as ``run`` uses them), and scores them. The
held-out images are never read, so a screen can choose what ``heldout.py`` then measures.

    python benchmarks/classifier_screen.py --preset camvid --seeds 0,1 --steps 310 \\
        --variant 'uniform={"balance_classes": 0}' --variant 'lse={"pooling": "lse"}'

A variant is ``NAME=JSON``: ``ClassifierSettings`` fields (those of ``wsss-domains train``); an
unknown field fails before anything trains. Fields a variant leaves out keep the job's settings:
labels from masks at the preset's patch size, and the recipe's class balancing. Finished
classifiers and scores (``<out>/<variant>-seed<s>/``) are reused when re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import DATA_ROOT, PRESETS, ROOT, cached_comparison, mean_spread, record, section_head, splits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "classifier_screen.md"


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` -> (name, ClassifierSettings fields), checked against the settings' fields."""
    from dataclasses import fields

    from wsss_domains.pipeline.classifier import ClassifierSettings

    name, sep, options = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f'--variant {text!r}: expected NAME=JSON, e.g. \'lse={{"pooling": "lse"}}\'')
    try:
        chosen = json.loads(options) if options.strip() else {}
    except json.JSONDecodeError as err:
        raise SystemExit(f"--variant {name}: its options are not JSON ({err})") from None
    if not isinstance(chosen, dict):
        raise SystemExit(f"--variant {name}: its options must be a JSON object")
    known = {f.name for f in fields(ClassifierSettings)}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise SystemExit(f"--variant {name}: unknown classifier settings {unknown}; known: {sorted(known)}")
    return name.strip(), chosen


def screen(job: Path, preset_name: str, data: Path, train: str, scored: str, seed: int, steps: int,
           chosen: dict) -> dict:  # fmt: skip
    """Train (or reuse) the variant's classifier in ``job``, pseudo-label ``scored`` with the recipe, score."""
    from wsss_domains.cam.settings import CamSettings
    from wsss_domains.domains import create_domain
    from wsss_domains.pipeline.classifier import ClassifierSettings, train_classifier
    from wsss_domains.pipeline.evaluate import evaluate_split
    from wsss_domains.pipeline.pseudo_labels import pseudo_label_split
    from wsss_domains.pipeline.run import cam_scales, classifier_balance

    preset = PRESETS[preset_name]
    recipe = create_domain(preset.domain).recipe(preset.dataset)
    settings = {"labels_from_masks": True, "patch_size": preset.patch_size, "device": "cpu", **chosen}
    settings.update(max_minutes=None, max_steps=steps, seed=seed)
    settings["balance_classes"] = classifier_balance(settings.get("balance_classes"), recipe)
    options = ClassifierSettings(**settings)

    def compute() -> dict:
        start = time.perf_counter()
        trained = train_classifier(preset.domain, data, job / "classifier", split=train, dataset=preset.dataset,
                                   settings=options, log=False)  # fmt: skip
        trained_seconds = time.perf_counter() - start
        patch = trained.config.patch_size
        loader = {"labels_from_masks": True, "patch_size": tuple(patch)} if trained.config.labels_from_masks and patch else {}  # fmt: skip
        cam = CamSettings(scales=cam_scales(None, recipe), cam_norm=recipe.cam_norm)
        out = job / "pseudo-labels"
        pseudo_label_split(job / "classifier", preset.domain, preset.dataset, data, scored, out,
                           method_name=recipe.method, options=dict(recipe.method_options), cam=cam,
                           overlays=False, dataset_options=loader)  # fmt: skip
        evaluation = evaluate_split(preset.domain, preset.dataset, data, scored, out, dataset_options=loader)
        return {"evaluation": evaluation.to_dict(), "classifier_seconds": round(trained_seconds, 1),
                "settings": settings, "method": recipe.method}  # fmt: skip

    return cached_comparison(job / "screen", compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), required=True)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--variant", action="append", required=True, metavar="NAME=JSON",
                   help="a classifier variant (repeat the option for each); JSON of ClassifierSettings fields")  # fmt: skip
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=310, help="optimiser steps of each classifier")
    p.add_argument("--every", type=int, default=8, help="score one fold of K of the training split")
    p.add_argument("--out", type=Path, help="default: runs/classifier-screen-<preset>")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("--variant names must differ")
    if args.steps < 1 or args.every < 1:
        raise SystemExit("--steps and --every must be at least 1")

    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    out = args.out or ROOT / "runs" / f"classifier-screen-{args.preset}"
    # The training split of the first held-out job: the whole split where the test split is fixed.
    train = splits(preset, preset.folds)[0][1]
    if "[" in train and args.every > 1:
        raise SystemExit(
            f"--every applies to a plain split; {args.preset} trains on {train!r}: give --every 1"
        )
    scored = f"{train}[fold=1/{args.every}]" if args.every > 1 else train
    seeds = [int(s) for s in args.seeds.split(",")]
    load_before, started = os.getloadavg(), time.perf_counter()
    results: dict[str, list[dict]] = {}
    for name, chosen in variants:
        for seed in seeds:
            with progress_bars(False):
                result = screen(
                    out / f"{name}-seed{seed}", args.preset, data, train, scored, seed, args.steps, chosen
                )
            results.setdefault(name, []).append(result)
            ev = result["evaluation"]
            print(f"{name} seed {seed}: mIoU {ev['miou']:.4f} ({result['seconds']:.0f} s)", flush=True)
    classes = list(next(iter(results.values()))[0]["evaluation"]["per_class_iou"])
    lines = section_head(
        f"{args.preset}: {', '.join(name for name, _ in variants)}, seeds {args.seeds}",
        f"{preset.note}. Each classifier {args.steps} steps on `{train}` (labels from masks), seeds "
        f"{args.seeds}; pseudo-labels of `{scored}` (labels given) by the recipe's `{results[variants[0][0]][0]['method']}`",
        load_before,
        started,
    )
    lines += ["\n| variant | settings | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | load at start |",
              "|---|---|" + "---|" * len(seeds) + "---|---|"]  # fmt: skip
    for name, chosen in variants:
        mious = [r["evaluation"]["miou"] for r in results[name]]
        loads = " / ".join(f"{r['load_at_start'][0]:.2f}" for r in results[name])
        setting = ", ".join(f"`{k}={v}`" for k, v in chosen.items()) or "the job's"
        balance = results[name][0]["settings"]["balance_classes"]
        if "balance_classes" not in chosen:  # the recipe's, which a reader cannot see in the variant
            setting += f"; recipe's balancing T = {balance:g}" if balance else "; uniform (recipe)"
        lines.append(f"| {name} | {setting} | " + " | ".join(f"{m:.4f}" for m in mious)
                     + f" | **{mean_spread(mious)}** | {loads} |")  # fmt: skip
    lines += ["\nPer-class IoU (mean over seeds):\n", "| variant | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]  # fmt: skip
    for name, _ in variants:
        per_class = [
            statistics.mean(r["evaluation"]["per_class_iou"][c] for r in results[name]) for c in classes
        ]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per_class) + " |")
    record(RESULTS, "Classifier options screened on part of the training split", lines, args.no_record)


if __name__ == "__main__":
    main()
