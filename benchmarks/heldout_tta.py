"""Test-time augmentation (several scales, quarter turns) compared on the same held-out segmenters.

For every fold and seed that ``heldout.py`` ran, the job's trained segmenter segments its held-out
fold again (no labels, as in the job) with ``--tta-scales``: the image is also seen resized by each
factor and the class probabilities are averaged (on top of the flip the job already used). Nothing
is trained, so the two columns differ only by the test-time views; pooled mIoU and its spread over
seeds say whether they help by more than the noise. ``--tta-rotations`` adds each window turned by
90, 180 and 270 degrees (with the flip: the eight symmetries of a square; for imagery without an
up). Choose the views before looking at the result: these are the scored images.

    python benchmarks/heldout.py --preset camvid --seeds 0,1
    python benchmarks/heldout_tta.py --preset camvid --seeds 0,1 --tta-scales 0.75,1,1.25
    python benchmarks/heldout_tta.py --preset histo --seeds 0,1 --tta-scales 1 --tta-rotations

A finished comparison (``tta-<scales>[-turns]/report.json`` in the job) is reused when re-run.
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
    finished_jobs,
    jobs_folder,
    record,
    section_head,
)

RESULTS = ROOT / "benchmarks" / "results" / "heldout_tta.md"


def resegment(
    job: Path, report: dict, data: Path, test: str, scales: tuple[float, ...], rotations: bool = False
) -> dict:
    """The job's segmenter on ``test`` with the test-time ``scales`` (and quarter turns with ``rotations``;
    the job's other inference options), scored."""
    from wsss_domains.pipeline.evaluate import evaluate_split
    from wsss_domains.pipeline.predict import predict_split
    from wsss_domains.segmentation.inference import InferenceOptions

    domain, dataset = report["domain"], report["dataset"]
    inference = {**report["settings"]["inference"], "tta_scales": scales, "tta_rotations": rotations}
    out = job / (f"tta-{','.join(f'{s:g}' for s in scales)}" + ("-turns" if rotations else ""))

    def compute() -> dict:
        predict_split(job / "segmenter", data, out / "predictions", split=test, dataset=dataset,
                      options=InferenceOptions(**inference))  # fmt: skip
        evaluation = evaluate_split(domain, dataset, data, test, out / "predictions")
        return {"evaluation": evaluation.to_dict()}

    return cached_comparison(out, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument("--tta-scales", required=True, help="test-time scales, e.g. 0.75,1,1.25 (1: one scale)")
    p.add_argument(
        "--tta-rotations", action="store_true", help="also each window turned by 90, 180 and 270 degrees"
    )
    args = p.parse_args()
    scales = tuple(float(s) for s in args.tta_scales.split(","))

    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    views = f"scales {args.tta_scales}" + (", quarter turns" if args.tta_rotations else "")
    tta = f"{SEGMENTER} [{views}]"
    for name, _train, test, seed, job, report in finished_jobs(args):
        with progress_bars(False):
            result = resegment(job, report, data, test, scales, args.tta_rotations)
        stages = {s["name"]: s.get("evaluation") for s in report["stages"]}
        scores = {SEGMENTER: stages[SEGMENTER], tta: result["evaluation"]}
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(
            f"{name} seed {seed}: " + ", ".join(f"{k} {v['miou']:.4f}" for k, v in scores.items()), flush=True
        )
    columns = (
        (SEGMENTER, "segmenter held-out, flip"),
        (tta, f"segmenter held-out, flip + {views}"),
    )
    lines = section_head(
        f"{args.preset}: test-time {views}, seeds {args.seeds}",
        f"{preset.note}. The held-out jobs' own segmenters, each held-out fold segmented again without labels "
        f"with the test-time {views} (nothing retrained; the job's window, overlap and flip); jobs "
        f"`{jobs_folder(args)}`",
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(RESULTS, "Test-time augmentation on the held-out segmenters", lines, args.no_record)


if __name__ == "__main__":
    main()
