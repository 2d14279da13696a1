"""The segmenter's ceiling at a budget: the held-out benchmark's segmenter trained on ground truth.

For every fold and seed that ``heldout.py`` ran, the training split's ground-truth masks (at the
pseudo-labels' granularity: whole images or the classifier's patches) take the place of the
pseudo-labels; the same segmenter recipe (architecture, crop, encoder weights, budget, seed) trains
on them and segments the held-out fold without labels. The classifier run of the job is reused only
for the segmenter's configuration (domain, dataset, patch size, input statistics).

The pooled mIoU against the pseudo-label-trained segmenter of the same jobs tells how much better
pseudo-labels could win at this budget with this many training images, and whether a target is
reachable at all by pseudo-label quality alone.

    python benchmarks/heldout.py --preset histo --seeds 0 --classifier-minutes 10 --segmenter-minutes 10
    python benchmarks/segmenter_ceiling.py --preset histo --seeds 0 --segmenter-minutes 10

A finished job (its ``ceiling/report.json``) is reused when the script is re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import DATA_ROOT, PRESETS, ROOT, SEGMENTER, comparison_lines, record, splits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "segmenter_ceiling.md"
CEILING = "segmenter trained on ground truth"


def write_ground_truth(opened_dataset, out: Path, palette: list[int]) -> int:  # noqa: ANN001
    """Each sample's ground-truth mask as the PNG a pseudo-label of that sample would be."""
    from wsss_domains.data.io import save_palette_png
    from wsss_domains.evaluation.evaluate import pred_filename

    out.mkdir(parents=True, exist_ok=True)
    for index in range(len(opened_dataset)):
        sample = opened_dataset[index]
        save_palette_png(out / pred_filename(sample["id"]), sample["mask"].numpy(), palette)
    return len(opened_dataset)


def ceiling_of(
    job: Path, preset_name: str, data: Path, train: str, test: str, minutes: float, seed: int
) -> dict:
    """Train the job's segmenter recipe on ground truth and score it on the held-out split (reused if done)."""
    from wsss_domains.pipeline.data import open_dataset
    from wsss_domains.pipeline.evaluate import evaluate_split
    from wsss_domains.pipeline.predict import predict_split
    from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter
    from wsss_domains.training.run import RunConfig

    out = job / "ceiling"
    done = out / "report.json"
    if done.is_file():
        return json.loads(done.read_text())
    preset = PRESETS[preset_name]
    config = RunConfig.load(job / "classifier")
    patch = config.patch_size
    options = (
        {"labels_from_masks": True, "patch_size": tuple(patch)} if config.labels_from_masks and patch else {}
    )
    saved = json.loads((job / "report.json").read_text())["settings"]["segmenter"]
    settings = SegmenterSettings(
        **{**saved, "training": "cross-entropy", "rounds": 1, "max_minutes": minutes, "seed": seed}
    )
    opened = open_dataset(preset.domain, preset.dataset, data, train, **options)
    start = time.perf_counter()
    count = write_ground_truth(
        opened.dataset, out / "ground-truth" / "train", opened.label_space.flat_palette()
    )
    fit_segmenter(job / "classifier", out / "ground-truth" / "train", data, out / "segmenter", split=train,
                  dataset=preset.dataset, dataset_options=options, settings=settings)  # fmt: skip
    predict_split(out / "segmenter", data, out / "predictions", split=test, dataset=preset.dataset)
    evaluation = evaluate_split(preset.domain, preset.dataset, data, test, out / "predictions").to_dict()
    result = {"evaluation": evaluation, "training_samples": count, "seconds": round(time.perf_counter() - start, 1),
              "load_at_start": list(os.getloadavg())}  # fmt: skip
    done.write_text(json.dumps(result, indent=2, default=str))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), required=True)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--jobs", type=Path, help="heldout.py's output folder (default: runs/heldout-<preset>)")
    p.add_argument("--folds", type=int, help="number of folds (default: the preset's)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--segmenter-minutes", type=float, default=10.0)
    p.add_argument("--only", help="comma-separated fold names to run (e.g. fold1)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    jobs = args.jobs or ROOT / "runs" / f"heldout-{args.preset}"
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    chosen = splits(preset, args.folds or preset.folds)
    if args.only:
        chosen = [c for c in chosen if c[0] in args.only.split(",")]
    for name, train, test in chosen:
        for seed in seeds:
            job = jobs / f"{name}-seed{seed}"
            if not (job / "report.json").is_file():
                sys.exit(f"{job}: no finished heldout.py job here; run heldout.py first (or name --jobs)")
            with progress_bars(False):
                result = ceiling_of(job, args.preset, data, train, test, args.segmenter_minutes, seed)
            stages = {
                s["name"]: s.get("evaluation")
                for s in json.loads((job / "report.json").read_text())["stages"]
            }
            scores = {CEILING: result["evaluation"]}
            if stages.get(SEGMENTER):
                scores[SEGMENTER] = stages[SEGMENTER]
            rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
            print(f"{name} seed {seed}: ground truth {result['evaluation']['miou']:.4f}", flush=True)
    columns = ((SEGMENTER, "segmenter on pseudo-labels"), (CEILING, "segmenter on ground truth"))
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {args.preset}, seeds {args.seeds}",
        f"\n{preset.note}. Segmenter {args.segmenter_minutes:g} min per run (the held-out jobs' recipe), trained "
        f"on the training folds' ground-truth masks; jobs `{jobs}`; {platform.machine()}, {os.cpu_count()} "
        f"cores; load average (1 min) before {load_before[0]:.2f}; {(time.perf_counter() - started) / 60:.0f} "
        "min wall.",
    ]
    lines += comparison_lines(rows, columns, preset)
    record(
        RESULTS,
        "The segmenter's ceiling: the held-out recipe trained on ground-truth masks",
        lines,
        args.no_record,
    )


if __name__ == "__main__":
    main()
