"""A light head on the classifier's frozen features as the label-free predictor, against the segmenter.

On WSSS4LUAD the held-out jobs' segmenter (DeepLabV3+, 5 CPU minutes) stays near 0.53 on ROIs without
labels, and trained on ground-truth masks for 10 minutes it reaches only 0.61: the segmenter's own
training is a limit at this budget. A head on frozen features trains to convergence in seconds
(the WeCLIP idea: a frozen backbone and a light decoder trained on the pseudo-labels). This script
asks whether that predicts better: for every finished ``heldout.py`` job, the features label-probe
reads (the job's classifier's stride-4 and stride-8 stages and the optical density, on the
stride-8 grid) are computed for the training patches, each cell labelled by the job's own
pseudo-labels (``pseudo-labels/train``; a cell whose majority class covers less than 60 % of it is
left out), a ``--head`` is trained on them (``linear``, or ``mlp``: one hidden layer of 256, ReLU,
dropout 0.2), and the held-out ROIs are segmented by it alone, without labels, upsampled
bilinearly, and scored as the segmenter's predictions are.

    python benchmarks/heldout.py --preset histo --seeds 0,1 --classifier-minutes 5 --segmenter-minutes 5
    python benchmarks/heldout_frozen_head.py --preset histo --seeds 0,1 --head linear

``--method sam-label-probe --method-option features=sam+backbone`` reads that method's features
instead (LiteMedSAM's window embeddings beside the CNN's stages and the optical density; the
windows come from the SAM embedding cache, so a job whose refinement already embedded them embeds
nothing), to ask whether the SAM encoder's context on a 256-pixel window carries what a stride-8
cell of the CNN lacks (folder ``frozen-head-<head>-<method>-<key>=<value>``).

    python benchmarks/heldout_frozen_head.py --preset histo --seeds 0,1 --head mlp \\
        --method sam-label-probe --method-option features=sam+backbone

Heads are trained for ``--steps`` Adam steps on random batches of 8192 cells (seeded by the job's
seed), not on a clock, so the figure does not depend on the load. A finished comparison
(``frozen-head-<head>/report.json`` in the job) is reused when re-run.
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
    finished_jobs,
    jobs_folder,
    method_options,
    options_suffix,
    record,
    section_head,
)

RESULTS = ROOT / "benchmarks" / "results" / "heldout_frozen_head.md"
SEGMENTER = STAGES[3][0]
HEADS = ("linear", "mlp")
MIN_SHARE = 0.6  # a training cell's majority pseudo-label class must cover this much of it
BATCH = 8192
HIDDEN = 256
FEATURE_METHODS = ("label-probe", "sam-label-probe")  # methods whose ``_features`` the head reads


def head_network(kind: str, cells, classes: int):
    """The head, standardising its input like the training ``cells`` (``N x D``)."""
    from torch import nn

    from wsss_domains.methods.stage_probe import PixelProbe

    if kind == "linear":
        return PixelProbe(cells.mean(0), cells.std(0).clamp_min(1e-5), classes)

    class MLP(PixelProbe):
        def __init__(self) -> None:
            super().__init__(cells.mean(0), cells.std(0).clamp_min(1e-5), classes)
            self.linear = nn.Sequential(
                nn.Linear(cells.shape[1], HIDDEN), nn.ReLU(), nn.Dropout(0.2), nn.Linear(HIDDEN, classes)
            )

    return MLP()


def labelled_cells(method, domain, dataset, folder: Path, foreground: list[int]):
    """Features (``N x D``) and class indices (``N``) of the training cells the pseudo-labels name clearly."""
    import torch
    from torch.nn import functional as F

    from wsss_domains.data.io import read_index_mask
    from wsss_domains.evaluation.evaluate import pred_filename

    k = len(foreground)
    features, targets = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            feats = method._features(sample["image"], domain)[0]  # label-probe's input, D x h x w
            labels = read_index_mask(folder / pred_filename(sample["id"]))
            index = torch.full(labels.shape, k, dtype=torch.long)  # k: ignored or excluded pixels
            for j, c in enumerate(foreground):
                index[labels == c] = j
            onehot = torch.zeros(k + 1, *labels.shape).scatter_(0, index[None], 1.0)
            share, target = F.adaptive_avg_pool2d(onehot[None], feats.shape[-2:])[0].max(0)
            target[(target == k) | (share < MIN_SHARE)] = -1
            features.append(feats.flatten(1).T)
            targets.append(target.flatten())
    x, y = torch.cat(features), torch.cat(targets)
    return x[y >= 0], y[y >= 0]


def head_folder(head: str, feature_method: str, options: dict[str, object]) -> str:
    """The job's subfolder of a comparison (label-probe's features keep the first runs' name)."""
    if feature_method == "label-probe" and not options:
        return f"frozen-head-{head}"
    return f"frozen-head-{head}-{feature_method}" + options_suffix(options)


def compare(
    job: Path,
    report: dict,
    data: Path,
    test: str,
    head: str,
    steps: int,
    seed: int,
    feature_method: str = "label-probe",
    options: dict[str, object] | None = None,
) -> dict:
    """The job's held-out fold segmented without labels by a ``head`` trained on its pseudo-labels, scored."""
    options = options or {}
    out = job / head_folder(head, feature_method, options)

    def compute() -> dict:
        import torch
        from torch.nn import functional as F

        from wsss_domains.data.io import save_palette_png
        from wsss_domains.evaluation.evaluate import pred_filename
        from wsss_domains.methods.registry import create_method
        from wsss_domains.pipeline.data import open_dataset
        from wsss_domains.pipeline.evaluate import evaluate_split
        from wsss_domains.training.run import load_run

        config, model, modules = load_run(job / "classifier")
        train = open_dataset(
            report["domain"], report["dataset"], data, report["train_split"],
            labels_from_masks=True, patch_size=tuple(config.patch_size),
        )  # fmt: skip
        domain, space = train.domain, train.label_space
        method = create_method(feature_method, **options)
        method.extractor(model, modules, scales=(1.0,), flip=False, base_scale=config.base_scale)
        method.setup(domain, config.mean, config.std)
        foreground = list(space.foreground)
        x, y = labelled_cells(method, domain, train.dataset, job / "pseudo-labels" / "train", foreground)
        torch.manual_seed(seed)
        net = head_network(head, x, len(foreground))
        optimiser = torch.optim.Adam(
            net.parameters(), lr=1e-2 if head == "linear" else 1e-3, weight_decay=1e-4
        )
        cells = x[:, :, None, None]
        for _ in range(steps):
            batch = torch.randint(len(x), (BATCH,))
            loss = F.cross_entropy(net(cells[batch])[:, :, 0, 0], y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        net.eval()
        test_set = open_dataset(report["domain"], report["dataset"], data, test).dataset
        lut = torch.tensor(foreground)
        (out / "test").mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for i in range(len(test_set)):
                sample = test_set[i]
                logits = net(method._features(sample["image"], domain))
                logits = F.interpolate(
                    logits, size=sample["image"].shape[-2:], mode="bilinear", align_corners=False
                )
                labels = lut[logits[0].argmax(0)].numpy().astype("uint8")
                save_palette_png(out / "test" / pred_filename(sample["id"]), labels, space.flat_palette())
        scored = evaluate_split(report["domain"], report["dataset"], data, test, out / "test")
        return {
            "scores": {"label-free": scored.to_dict()},
            "training_cells": len(x),
            "features": int(x.shape[1]),
        }

    return cached_comparison(out, compute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument("--head", choices=HEADS, required=True, help="the head trained on the frozen features")
    p.add_argument("--steps", type=int, help="Adam steps (default: 300 linear, 1000 mlp)")
    p.add_argument(
        "--method",
        choices=FEATURE_METHODS,
        default="label-probe",
        help="whose pixel features the head reads (default: label-probe's)",
    )
    add_method_option_argument(p, "features=sam+backbone")
    args = p.parse_args()
    options = method_options(args)
    steps = args.steps or (300 if args.head == "linear" else 1000)
    from wsss_domains.progress import progress_bars

    preset = PRESETS[args.preset]
    data = args.data_root / preset.path
    source = (
        ""
        if args.method == "label-probe" and not options
        else f" ({args.method}{options_suffix(options, ' ')})"
    )
    compared = f"frozen features{source}, {args.head} head"
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, _train, test, seed, job, report in finished_jobs(args):
        if report["recipe"]["method"] != "label-probe" or report["domain"] != "histo":
            sys.exit(
                f"{job}: the frozen features are label-probe's, with the optical density: histology only"
            )
        with progress_bars(False):
            result = compare(job, report, data, test, args.head, steps, seed, args.method, options)
        stages = {s["name"]: s.get("evaluation") for s in report["stages"]}
        scores = {compared: result["scores"]["label-free"], SEGMENTER: stages[SEGMENTER]}
        rows.append({"fold": name, "seed": seed, "scores": scores, "load": result["load_at_start"]})
        print(
            f"{name} seed {seed}: " + ", ".join(f"{k} {v['miou']:.4f}" for k, v in scores.items()), flush=True
        )
    columns = ((SEGMENTER, "segmenter (DeepLabV3+)"), (compared, compared))
    lines = section_head(
        f"{args.preset}: {compared} ({steps} steps) against the segmenter, seeds {args.seeds}",
        f"{preset.note}. Held-out images without labels; the head is trained on each job's own pseudo-labels "
        f"of its training patches, on its classifier's frozen stages; jobs `{jobs_folder(args)}`",
        load_before,
        started,
    )
    lines += comparison_lines(rows, columns, preset)
    record(
        RESULTS,
        "A light head on the classifier's frozen features, on the held-out jobs",
        lines,
        args.no_record,
    )


if __name__ == "__main__":
    main()
