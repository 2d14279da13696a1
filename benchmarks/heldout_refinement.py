"""A pseudo-label refinement compared on the same held-out jobs: each job's classifier, another method.

For every fold and seed that ``heldout.py`` ran, the job's trained classifier pseudo-labels its
training split and its held-out fold (image-level labels given, as WSSS pseudo-labels are) with
``--method`` instead of the job's recipe, and both are scored against the masks. The classifier is
shared, so the columns differ only by the post-hoc method (one that trains nothing of its own:
``label-probe+fma-seed`` on a ``label-probe`` job adds FMA's SAM seeding to the recipe). Pooled mIoU
and its spread over seeds say whether the method helps by more than the noise.

    python benchmarks/heldout.py --preset histo --seeds 0,1 --classifier-minutes 5 --segmenter-minutes 5
    python benchmarks/heldout_refinement.py --preset histo --seeds 0,1 --method label-probe+fma-seed

``--scales`` sets the CAM scales instead of the default ones (the folder is then
``refinement-<method>-scales<...>``), ``--method-option KEY=VALUE`` an option of the method (folder
``refinement-<method>-<key>=<value>``); a later ``segmenter_training.py --pseudo-labels`` trains the
job's segmenter on the compared pseudo-labels.

    python benchmarks/heldout_refinement.py --preset camvid --seeds 0,1 --method cam-proto --scales 1,1.5,2,3

A finished comparison (``refinement-<method>/report.json`` in the job) is reused when re-run.
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

RESULTS = ROOT / "benchmarks" / "results" / "heldout_refinement.md"
TRAIN, TEST = STAGES[0][0], STAGES[1][0]


def refinement_name(
    method: str, scales: tuple[float, ...] | None = None, options: dict[str, object] | None = None
) -> str:
    """The compared pseudo-labels' folder in the job: the method, its options and the CAM scales where given."""
    name = f"refinement-{method}" + options_suffix(options or {})
    return name + ("-scales" + "-".join(f"{s:g}" for s in scales) if scales else "")


def relabel(job: Path, report: dict, data: Path, train: str, test: str, method: str,
            scales: tuple[float, ...] | None = None, method_options: dict[str, object] | None = None) -> dict:  # fmt: skip
    """Pseudo-labels of ``train`` and ``test`` (labels given) by the job's classifier with ``method``
    (its ``method_options``, and CAM ``scales`` where given), scored."""
    from wsss_domains.cam.settings import CamSettings
    from wsss_domains.pipeline.evaluate import evaluate_split
    from wsss_domains.pipeline.pseudo_labels import pseudo_label_split

    domain, dataset = report["domain"], report["dataset"]
    options = dataset_options(job)
    out = job / refinement_name(method, scales, method_options)
    cam = CamSettings(cam_norm=report["recipe"]["cam_norm"], **({"scales": scales} if scales else {}))

    def compute() -> dict:
        scores = {}
        for stage, split, folder in ((TRAIN, train, "train"), (TEST, test, "test")):
            pseudo_label_split(job / "classifier", domain, dataset, data, split, out / folder, method_name=method,
                               options=method_options, cam=cam, overlays=False,
                               dataset_options=options)  # fmt: skip
            scores[stage] = evaluate_split(
                domain, dataset, data, split, out / folder, dataset_options=options
            ).to_dict()
        return {"scores": scores}

    return cached_comparison(out, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument(
        "--method", required=True, help="the post-hoc method to compare, e.g. label-probe+fma-seed"
    )
    p.add_argument(
        "--scales",
        help="CAM scales of the compared pseudo-labels, e.g. 1,1.5,2,3 (default: the engine's 1,0.5,1.5,2)",
    )
    add_method_option_argument(p, "features=sam+backbone")
    args = p.parse_args()
    options = method_options(args)
    scales = tuple(float(v) for v in args.scales.split(",")) if args.scales else None
    compared = args.method + options_suffix(options, " ")
    compared += f" (scales {args.scales})" if scales else ""

    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    rows = []
    recipe = "?"
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, train, test, seed, job, report in finished_jobs(args):
        recipe = report["recipe"]["method"]
        with progress_bars(False):
            result = relabel(job, report, data, train, test, args.method, scales, options)
        stages = {s["name"]: s.get("evaluation") for s in report["stages"]}
        scores = {f"{stage} [{compared}]": value for stage, value in result["scores"].items()}
        scores.update({stage: stages[stage] for stage in (TRAIN, TEST) if stages.get(stage)})
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(
            f"{name} seed {seed}: " + ", ".join(f"{k} {v['miou']:.4f}" for k, v in scores.items()), flush=True
        )
    columns = (
        (TRAIN, f"PL train, {recipe}"),
        (f"{TRAIN} [{compared}]", f"PL train, {compared}"),
        (TEST, f"PL held-out, {recipe}"),
        (f"{TEST} [{compared}]", f"PL held-out, {compared}"),
    )
    lines = section_head(
        f"{args.preset}: {compared} against {recipe}, seeds {args.seeds}",
        f"{preset.note}. Pseudo-labels with image-level labels given, by each job's own classifier (same "
        f"classifier; only the post-hoc method{' and the CAM scales differ' if scales else ' differs'}); jobs "
        f"`{jobs_folder(args)}`",
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(RESULTS, "Post-hoc pseudo-label methods on the same held-out jobs", lines, args.no_record)


if __name__ == "__main__":
    main()
