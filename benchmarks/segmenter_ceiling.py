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
    python benchmarks/segmenter_ceiling.py --preset deepglobe --stratified --seeds 0 --segmenter-minutes 15

A finished job (its ``ceiling/report.json``) is reused when the script is re-run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import (  # noqa: E402
    PRESETS,
    ROOT,
    SEGMENTER,
    add_job_arguments,
    cached_comparison,
    comparison_lines,
    dataset_options,
    finished_jobs,
    jobs_folder,
    record,
    section_head,
)

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


def ceiling_of(job: Path, report: dict, data: Path, train: str, test: str, minutes: float, seed: int) -> dict:
    """Train the job's segmenter recipe on ground truth and score it on the held-out split (reused if done)."""
    from wsss_domains.pipeline.data import open_dataset
    from wsss_domains.pipeline.evaluate import evaluate_split
    from wsss_domains.pipeline.predict import predict_split
    from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter

    out = job / "ceiling"
    domain, dataset = report["domain"], report["dataset"]
    options = dataset_options(job)
    saved = report["settings"]["segmenter"]
    settings = SegmenterSettings(
        **{**saved, "training": "cross-entropy", "rounds": 1, "max_minutes": minutes, "seed": seed}
    )

    def compute() -> dict:
        opened = open_dataset(domain, dataset, data, train, **options)
        count = write_ground_truth(
            opened.dataset, out / "ground-truth" / "train", opened.label_space.flat_palette()
        )
        fit_segmenter(job / "classifier", out / "ground-truth" / "train", data, out / "segmenter", split=train,
                      dataset=dataset, dataset_options=options, settings=settings)  # fmt: skip
        predict_split(out / "segmenter", data, out / "predictions", split=test, dataset=dataset)
        evaluation = evaluate_split(domain, dataset, data, test, out / "predictions").to_dict()
        return {"evaluation": evaluation, "training_samples": count}

    return cached_comparison(out, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument("--segmenter-minutes", type=float, default=10.0)
    args = p.parse_args()

    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, train, test, seed, job, report in finished_jobs(args):
        with progress_bars(False):
            result = ceiling_of(job, report, data, train, test, args.segmenter_minutes, seed)
        stages = {s["name"]: s.get("evaluation") for s in report["stages"]}
        scores = {CEILING: result["evaluation"]}
        if stages.get(SEGMENTER):
            scores[SEGMENTER] = stages[SEGMENTER]
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(f"{name} seed {seed}: ground truth {result['evaluation']['miou']:.4f}", flush=True)
    columns = ((SEGMENTER, "segmenter on pseudo-labels"), (CEILING, "segmenter on ground truth"))
    lines = section_head(
        f"{args.preset}, seeds {args.seeds}",
        f"{preset.note}. Segmenter {args.segmenter_minutes:g} min per run (the held-out jobs' recipe), trained "
        f"on the training folds' ground-truth masks; jobs `{jobs_folder(args)}`",
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(
        RESULTS,
        "The segmenter's ceiling: the held-out recipe trained on ground-truth masks",
        lines,
        args.no_record,
    )


if __name__ == "__main__":
    main()
