"""Segmenters of one held-out job averaged: do segmenters trained at different magnifications agree
where each alone fails?

On WSSS4LUAD a segmenter trained and run at half scale (``segmenter_training.py --scale 0.5``) finds
the normal lung that the full-scale one misses on one fold, and loses tumour / stroma texture on the
others. This script asks whether their average does better than either: for every finished
``heldout.py`` job, the class probabilities of each ``--members`` segmenter folder of the job
(``segmenter`` is the job's own; others are ``segmenter_training.py``'s ``<folder>/segmenter``) are
averaged on each held-out image, without labels, the argmax written (the domain's excluded pixels
left out, as ``predict`` does) and scored as the job's segmenter is.

    python benchmarks/segmenter_training.py --preset histo --seeds 0,1 --training cross-entropy \\
        --scale 0.5 --segmenter-minutes 5
    python benchmarks/segmenter_ensemble.py --preset histo --seeds 0,1 \\
        --members segmenter,segmenter-cross-entropy-at0.5

No training here: the figure does not depend on the load. The ensemble costs each member's
training budget (two 5-minute segmenters: 10 minutes, inside the issue's 15). A finished ensemble
(``ensemble-<members>/report.json`` in the job) is reused when re-run.
"""

from __future__ import annotations

import argparse
import json
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

RESULTS = ROOT / "benchmarks" / "results" / "segmenter_ensemble.md"


def member_names(text: str) -> list[str]:
    """``--members`` as variant names: ``variant/segmenter`` (the folder itself) names ``variant``."""
    names = [m.strip().strip("/") for m in text.split(",") if m.strip().strip("/")]
    return [m.removesuffix("/segmenter") if m != "segmenter" else m for m in names]


def member_folder(job: Path, member: str) -> Path:
    """A member's trained segmenter folder in the job (``segmenter``: the job's own)."""
    folder = job / member if member == "segmenter" else job / member / "segmenter"
    if not (folder / "segmenter.json").is_file():
        raise SystemExit(f"{folder}: no trained segmenter there (run segmenter_training.py first)")
    if member != "segmenter" and not (job / member / "report.json").is_file():
        raise SystemExit(f"{job / member}: no report.json (segmenter_training.py did not finish there)")
    return folder


def ensemble(job: Path, report: dict, data: Path, test: str, members: list[str]) -> dict:
    """The held-out fold segmented by the members' averaged probabilities, scored."""
    out = job / ("ensemble-" + "+".join(members))

    def compute() -> dict:
        import torch

        from wsss_domains.data.io import save_palette_png
        from wsss_domains.evaluation.evaluate import pred_filename
        from wsss_domains.pipeline.data import open_dataset
        from wsss_domains.pipeline.evaluate import evaluate_split
        from wsss_domains.pipeline.predict import load_predictor
        from wsss_domains.segmentation.inference import InferenceOptions, labels_from_probabilities

        loaded = [load_predictor(member_folder(job, m), InferenceOptions(device="cpu")) for m in members]
        first = loaded[0]
        if any(m.config.classes != first.config.classes for m in loaded):
            raise SystemExit(f"{job}: the members predict different classes")
        opened = open_dataset(
            report["domain"], report["dataset"], data, test, domain_options=first.config.domain_options
        )
        space, domain = opened.label_space, opened.domain
        (out / "test").mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            for i in range(len(opened.dataset)):
                sample = opened.dataset[i]
                image = sample["image"]
                probs = sum(m.predictor.probabilities(m.predictor.prepare(image, domain)) for m in loaded)
                ids = labels_from_probabilities(probs, image, domain, space)
                save_palette_png(
                    out / "test" / pred_filename(sample["id"]),
                    ids.numpy().astype("uint8"),
                    space.flat_palette(),
                )
        scored = evaluate_split(report["domain"], report["dataset"], data, test, out / "test")
        return {"evaluation": scored.to_dict(), "members": members}

    return cached_comparison(out, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument(
        "--members",
        required=True,
        help="comma-separated segmenter folders of each job to average, e.g. segmenter,segmenter-cross-entropy-at0.5",
    )
    args = p.parse_args()
    members = member_names(args.members)
    if len(members) < 2:
        sys.exit("--members needs at least two segmenter folders")
    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    compared = "average of " + " + ".join(f"`{m}`" for m in members)
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    jobs = list(finished_jobs(args))
    for _name, _train, _test, _seed, job, _report in jobs:
        for member in members:
            member_folder(job, member)  # every member of every job exists before any is scored
    for name, _train, test, seed, job, report in jobs:
        scores = {}
        with progress_bars(False):
            for member in members:
                if member == "segmenter":
                    scores[member] = {s["name"]: s.get("evaluation") for s in report["stages"]}[SEGMENTER]
                else:
                    scores[member] = json.loads((job / member / "report.json").read_text())["evaluation"]
            result = ensemble(job, report, data, test, members)
        scores[compared] = result["evaluation"]
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(
            f"{name} seed {seed}: " + ", ".join(f"{k} {v['miou']:.4f}" for k, v in scores.items()), flush=True
        )
    columns = tuple((m, f"`{m}`") for m in members) + ((compared, "their average"),)
    lines = section_head(
        f"{args.preset}: {compared}, seeds {args.seeds}",
        f"{preset.note}. Held-out images without labels, each job's segmenters' class probabilities averaged; "
        f"jobs `{jobs_folder(args)}`",
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(RESULTS, "Segmenters averaged on the same held-out jobs", lines, args.no_record)


if __name__ == "__main__":
    main()
