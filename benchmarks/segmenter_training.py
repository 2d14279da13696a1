"""Segmenter training choices compared on the same held-out jobs: the job's own pseudo-labels, another loss.

For every fold and seed that ``heldout.py`` ran, the job's segmenter recipe (architecture, crop,
encoder weights, budget, seed) trains again on the job's own pseudo-labels of its training split,
with ``--training`` (``carb``, ``beco``, ``cross-entropy``) instead of the job's, and segments the
held-out fold without labels. Classifier and pseudo-labels are shared, so the two columns differ
only by the segmenter's training; the pooled mIoU and its spread over seeds say whether the choice
helps by more than the noise.

    python benchmarks/heldout.py --preset histo --seeds 0,1 --classifier-minutes 10 --segmenter-minutes 10
    python benchmarks/segmenter_training.py --preset histo --seeds 0,1 --training carb --segmenter-minutes 10
    python benchmarks/segmenter_training.py --preset camvid --seeds 0,1 --training cross-entropy --scale-range 0.5,2 \\
        --segmenter-minutes 15
    python benchmarks/segmenter_training.py --preset deepglobe --seeds 0 --training das --segmenter-minutes 10 \\
        --source-data ../shared/data/remote_sensing/loveda-sample --source-dataset loveda --source-split val \\
        --source-classes building=urban,road=urban,background=ignore

``--scale-range`` adds random magnification of the training samples (the compared folder is then
``segmenter-<training>-scale<low>-<high>``), ``--class-weighting median-frequency`` weights the
pixel loss per class (folder ``segmenter-<training>-median-frequency``), ``--balance-classes T``
draws the training images of rare classes more often (folder ``...-balanced<T>``), ``--arch`` /
``--encoder`` build another network than the job's (folder ``segmenter-<training>-<arch>-<encoder>``,
the encoder from its packaged ImageNet weights as the job's), ``--segmenter-seed N`` trains with seed N
instead of the job's (folder ``...-seed<N>``: the segmenter's own noise on the same pseudo-labels),
``--encoder-weights classifier`` starts the encoder from the job's trained classifier backbone instead
of ImageNet (folder ``...-from-classifier``), ``--scale S`` trains and predicts at magnification S
(0.5: every image halved, a crop sees four times the tissue; folder ``...-at<S>``) and ``--crop-size``
sets the training crop (folder ``...-crop<N>``). A finished
comparison (its ``report.json`` in that folder of the job) is reused when re-run.

    python benchmarks/segmenter_training.py --preset camvid --seeds 0,1 --training cross-entropy \\
        --class-weighting median-frequency --segmenter-minutes 15

``--pseudo-labels FOLDER`` trains on another set of the job's pseudo-labels instead of its own, e.g.
those ``heldout_refinement.py`` wrote (``refinement-<method>``; its ``train`` subfolder is used), so a
refinement is measured through the segmenter. ``--segmenter-steps N`` budgets the segmenter in
optimiser steps instead of minutes, so the same seed gives the same run on any machine.

    python benchmarks/segmenter_training.py --preset camvid --seeds 0,1 --training cross-entropy \\
        --pseudo-labels refinement-cam-proto-scales1-1.5-2-3 --segmenter-steps 1700
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
    budget_text,
    cached_comparison,
    comparison_lines,
    dataset_options,
    finished_jobs,
    jobs_folder,
    record,
    section_head,
    stage_budget,
)

RESULTS = ROOT / "benchmarks" / "results" / "segmenter_training.md"


def retrain(job: Path, preset_name: str, data: Path, train: str, test: str, training: str, minutes: float,
            seed: int, source: dict | None = None, scale_range: tuple[float, float] | None = None,
            class_weighting: str = "none", pseudo_labels: str | None = None,
            steps: int | None = None, balance_classes: float | None = None,
            network: dict[str, str] | None = None, seed_override: bool = False,
            encoder_weights: str | None = None, scale: float | None = None,
            crop_size: int | None = None) -> dict:  # fmt: skip
    """The job's segmenter recipe with ``training`` on the job's pseudo-labels, scored on ``test``.

    ``source``: Das et al.'s annotated source (``source_data``, ``source_dataset``, ``source_split``,
    ``source_classes`` of :class:`SegmenterSettings`). ``pseudo_labels``: the job's subfolder whose
    ``train`` pseudo-labels to train on instead of the job's own; ``steps``: a step budget instead of
    ``minutes``; ``balance_classes``: repeat-factor sampling's threshold (``segment --balance-classes``);
    ``network``: another ``arch`` and / or ``encoder`` than the job's (``segment --arch / --encoder``);
    ``seed_override``: ``seed`` is not the job's (the folder says so); ``encoder_weights``: where the
    encoder starts instead of the job's (``segment --encoder-weights``, e.g. ``classifier``); ``scale``:
    the magnification the segmenter trains and predicts at (``SegmenterSettings.scale``; 0.5 halves
    every image), ``crop_size``: its training crop side (default: the job's patch size at that scale)."""
    from wsss_domains.pipeline.evaluate import evaluate_split
    from wsss_domains.pipeline.predict import predict_split
    from wsss_domains.pipeline.segmenter import SegmenterSettings, fit_segmenter

    name = comparison_name(
        training, scale_range, class_weighting, pseudo_labels, steps, balance_classes, network,
        encoder_weights, scale, crop_size,
    )  # fmt: skip
    out = job / (name + (f"-seed{seed}" if seed_override else ""))
    labels = job / pseudo_labels / "train" if pseudo_labels else job / "pseudo-labels" / "train"
    if not labels.is_dir():
        raise SystemExit(f"{labels}: no pseudo-labels of the training split there")
    preset = PRESETS[preset_name]
    options = dataset_options(job)
    saved = json.loads((job / "report.json").read_text())["settings"]["segmenter"]
    settings = SegmenterSettings(
        **{**saved, "training": training, "rounds": 1, **stage_budget(minutes, steps), "seed": seed,
           **(source or {}), **(network or {}), **({"weights": encoder_weights} if encoder_weights else {})}
    )  # fmt: skip
    if scale_range is not None:
        settings.scale_range = scale_range
    if scale is not None:
        settings.scale = scale
    if crop_size is not None:
        settings.crop_size = crop_size
    settings.class_weighting = class_weighting
    if balance_classes is not None:  # else the job's own, as the rest of its recipe
        settings.balance_classes = balance_classes

    def compute() -> dict:
        fit_segmenter(job / "classifier", labels, data, out / "segmenter", split=train,
                      dataset=preset.dataset, dataset_options=options, settings=settings)  # fmt: skip
        predict_split(out / "segmenter", data, out / "predictions", split=test, dataset=preset.dataset)
        return {
            "evaluation": evaluate_split(
                preset.domain, preset.dataset, data, test, out / "predictions"
            ).to_dict()
        }

    return cached_comparison(out, compute)


def comparison_name(
    training: str,
    scale_range: tuple[float, float] | None,
    class_weighting: str = "none",
    pseudo_labels: str | None = None,
    steps: int | None = None,
    balance_classes: float | None = None,
    network: dict[str, str] | None = None,
    encoder_weights: str | None = None,
    scale: float | None = None,
    crop_size: int | None = None,
) -> str:
    """The compared segmenter's folder in the job: its training, architecture, encoder, its weights,
    magnification, crop, scale range, class weighting, class balancing, step budget and pseudo-labels
    where given."""
    name = f"segmenter-{training}"
    for key in ("arch", "encoder"):
        if (network or {}).get(key):
            name += f"-{network[key]}"  # type: ignore[index]
    if encoder_weights:
        name += f"-from-{Path(encoder_weights).stem}"
    if scale is not None:
        name += f"-at{scale:g}"
    if crop_size is not None:
        name += f"-crop{crop_size}"
    if scale_range is not None:
        name += f"-scale{scale_range[0]:g}-{scale_range[1]:g}"
    if class_weighting != "none":
        name += f"-{class_weighting}"
    if balance_classes:
        name += f"-balanced{balance_classes:g}"
    if steps is not None:
        name += f"-{steps}steps"
    if pseudo_labels:
        name += f"-on-{pseudo_labels}"
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument(
        "--training", required=True, help="the segmenter training to compare: carb, beco, cross-entropy"
    )
    p.add_argument("--segmenter-minutes", type=float, default=10.0)
    p.add_argument(
        "--scale",
        type=float,
        help="magnification the segmenter trains and predicts at, e.g. 0.5: every image halved, so a crop"
        " sees four times the tissue (folder ...-at<scale>)",
    )
    p.add_argument(
        "--crop-size", type=int, help="training crop side (folder ...-crop<N>; default: the job's)"
    )
    p.add_argument("--segmenter-steps", type=int, help="budget in optimiser steps instead of minutes")
    p.add_argument(
        "--pseudo-labels",
        metavar="FOLDER",
        help="the job's subfolder whose train/ pseudo-labels to train on (default: the job's own)",
    )
    p.add_argument(
        "--scale-range",
        help="LOW,HIGH: also magnify each training sample by a factor drawn uniformly from it (segment --scale-range)",
    )
    p.add_argument(
        "--class-weighting",
        default="none",
        choices=("none", "median-frequency"),
        help="per-class weights of the pixel loss (segment --class-weighting)",
    )
    p.add_argument(
        "--balance-classes",
        type=float,
        metavar="T",
        help="draw training images of rare classes more often, repeat factors with threshold T (segment"
        " --balance-classes)",
    )
    p.add_argument("--arch", help="another segmentation architecture than the job's (segment --arch)")
    p.add_argument(
        "--encoder",
        help="another timm encoder than the job's, e.g. tf_efficientnet_lite2 (segment --encoder)",
    )
    p.add_argument(
        "--encoder-weights",
        help="where the encoder starts instead of the job's ImageNet weights: 'classifier' (the job's trained"
        " backbone) or a state-dict path (segment --encoder-weights; folder ...-from-<name>)",
    )
    p.add_argument(
        "--segmenter-seed",
        type=int,
        help="train with this seed instead of each job's (the same pseudo-labels: the segmenter's own noise)",
    )
    p.add_argument("--source-data", type=Path, help="das: an annotated source dataset's folder")
    p.add_argument("--source-domain", help="das: the domain plugin that reads it (default: the job's)")
    p.add_argument("--source-dataset", help="das: its loader")
    p.add_argument("--source-split", help="das: its split")
    p.add_argument(
        "--source-classes", help="das: source=target class map, e.g. building=urban,background=ignore"
    )
    args = p.parse_args()
    source = {
        key: getattr(args, key)
        for key in ("source_data", "source_domain", "source_dataset", "source_split", "source_classes")
        if getattr(args, key) is not None
    }

    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    scale_range = None
    if args.scale_range:
        low, high = (float(v) for v in args.scale_range.split(","))
        scale_range = (low, high)
    compared = args.training + (f", scales {scale_range[0]:g}-{scale_range[1]:g}" if scale_range else "")
    compared += f", {args.class_weighting} class weights" if args.class_weighting != "none" else ""
    compared += f", classes balanced (T = {args.balance_classes:g})" if args.balance_classes else ""
    compared += f", on `{args.pseudo_labels}`" if args.pseudo_labels else ""
    network = {key: getattr(args, key) for key in ("arch", "encoder") if getattr(args, key)}
    compared += "".join(f", {key} {value}" for key, value in network.items())
    override = args.segmenter_seed is not None
    compared += f", segmenter seed {args.segmenter_seed}" if override else ""
    compared += f", encoder from {args.encoder_weights}" if args.encoder_weights else ""
    compared += f", at scale {args.scale:g}" if args.scale is not None else ""
    compared += f", crop {args.crop_size}" if args.crop_size is not None else ""
    other = f"segmenter trained with {compared}"
    rows = []
    report: dict = {}
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, train, test, seed, job, report in finished_jobs(args):
        with progress_bars(False):
            result = retrain(job, args.preset, data, train, test, args.training, args.segmenter_minutes,
                             args.segmenter_seed if override else seed, source, scale_range, args.class_weighting,
                             args.pseudo_labels, args.segmenter_steps, args.balance_classes, network,
                             override, args.encoder_weights, args.scale, args.crop_size)  # fmt: skip
        stages = {s["name"]: s.get("evaluation") for s in report["stages"]}
        scores = {other: result["evaluation"]}
        if stages.get(SEGMENTER):
            scores[SEGMENTER] = stages[SEGMENTER]
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(f"{name} seed {seed}: {compared} {result['evaluation']['miou']:.4f}", flush=True)
    job_training = report["settings"]["segmenter"]["training"] if rows else "?"
    columns = ((SEGMENTER, f"the job's segmenter ({job_training})"), (other, compared))
    lines = section_head(
        f"{args.preset}: {compared} against {job_training}, seeds {args.seeds}",
        f"{preset.note}. Segmenter {budget_text(args.segmenter_minutes, args.segmenter_steps)} per run on "
        + (
            f"the job's `{args.pseudo_labels}/train` pseudo-labels (same classifier, recipe and seed; the "
            "pseudo-labels differ)"
            if args.pseudo_labels
            else "each job's own pseudo-labels (same classifier, pseudo-labels, recipe and seed; only the "
            "training differs)"
        )
        + f"; jobs `{jobs_folder(args)}`"
        + (f"; source {source}" if source else ""),
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(RESULTS, "Segmenter training choices on the same held-out jobs", lines, args.no_record)


if __name__ == "__main__":
    main()
