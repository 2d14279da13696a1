"""Where the labels come from on images that have none: the held-out jobs' classifier pipeline with
another label source, against its own predicted labels and against the segmenter.

On held-out images without image-level labels the classifier pipeline takes the classes from the
classifier's logits (``heldout.py``'s "CAM pipeline held-out (no labels)" column). With labels given the
same pipeline scores far higher (WSSS4LUAD: about 0.70 against 0.37-0.44), so the label source is the
lever. This script re-labels each job's held-out fold with ``--source``:

- ``all``: every class assumed present; the method's own pixel decisions choose among them
  (``--method-option fuse_weight=1`` makes ``label-probe`` follow its probe alone);
- ``segmentation``: the classes of the job's own segmenter prediction of the image (``predictions/test``,
  images no stage saw with labels), a class present from ``--label-fraction`` of the scored pixels of a
  patch (0: one pixel, the dataset's own rule).

    python benchmarks/heldout.py --preset histo --seeds 0,1 --classifier-minutes 5 --segmenter-minutes 5
    python benchmarks/heldout_label_sources.py --preset histo --seeds 0,1 --source segmentation

A finished comparison (``label-free-<source>.../report.json`` in the job) is reused when re-run.
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
    STAGES,
    add_job_arguments,
    add_method_option_argument,
    cached_comparison,
    comparison_lines,
    dataset_options,
    finished_jobs,
    jobs_folder,
    method_options,
    options_suffix,
    record,
    section_head,
)

RESULTS = ROOT / "benchmarks" / "results" / "heldout_label_sources.md"
PREDICTED, SEGMENTER = STAGES[2][0], STAGES[3][0]


def source_name(source: str, options: dict[str, object], fraction: float) -> str:
    """The compared pseudo-labels' folder in the job: the source, the method's options and the fraction."""
    name = f"label-free-{source}" + options_suffix(options)
    return name + (f"-fraction{fraction:g}" if source == "segmentation" and fraction else "")


def relabel(job: Path, report: dict, data: Path, test: str, source: str, options: dict[str, object],
            fraction: float) -> dict:  # fmt: skip
    """The job's held-out fold pseudo-labelled by its classifier and recipe with labels from ``source``, scored."""
    from wsss_domains.cam.settings import CamSettings
    from wsss_domains.pipeline.pseudo_labels import pseudo_label_and_score

    recipe = report["recipe"]
    out = job / source_name(source, options, fraction)

    def compute() -> dict:
        scored = pseudo_label_and_score(
            job / "classifier", report["domain"], report["dataset"], data, test, out / "test", score=True,
            method_name=recipe["method"], options={**recipe["method_options"], **options},
            cam=CamSettings(cam_norm=recipe["cam_norm"]), overlays=False, dataset_options=dataset_options(job),
            label_free=source, label_segmentation=job / "predictions" / "test", label_fraction=fraction,
        )  # fmt: skip
        return {"scores": {"label-free": scored.report.to_dict()}}

    return cached_comparison(out, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument(
        "--source", choices=("all", "segmentation"), required=True, help="where the labels come from"
    )
    p.add_argument(
        "--label-fraction",
        type=float,
        default=0.0,
        help="--source segmentation: the share of a patch's scored pixels a class needs (0: one pixel)",
    )
    add_method_option_argument(p, "fuse_weight=1")
    args = p.parse_args()
    from wsss_domains.progress import progress_bars

    options = method_options(args)
    compared = args.source + options_suffix(options, " ")
    compared += f" (fraction {args.label_fraction:g})" if args.source == "segmentation" else ""
    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    rows = []
    recipe = "?"
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, _train, test, seed, job, report in finished_jobs(args):
        recipe = report["recipe"]["method"]
        with progress_bars(False):
            result = relabel(job, report, data, test, args.source, options, args.label_fraction)
        stages = {s["name"]: s.get("evaluation") for s in report["stages"]}
        scores = {compared: result["scores"]["label-free"]}
        scores.update({stage: stages[stage] for stage in (PREDICTED, SEGMENTER) if stages.get(stage)})
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(
            f"{name} seed {seed}: " + ", ".join(f"{k} {v['miou']:.4f}" for k, v in scores.items()), flush=True
        )
    columns = (
        (PREDICTED, f"{recipe}, classifier's labels"),
        (compared, f"{recipe}, labels: {compared}"),
        (SEGMENTER, "segmenter"),
    )
    lines = section_head(
        f"{args.preset}: labels from {compared} against the classifier's, seeds {args.seeds}",
        f"{preset.note}. Held-out images without labels, by each job's own classifier and recipe; only where "
        f"the image-level labels come from differs; jobs `{jobs_folder(args)}`",
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(RESULTS, "Label sources for images without labels, on the held-out jobs", lines, args.no_record)


if __name__ == "__main__":
    main()
