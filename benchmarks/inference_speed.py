"""Images per second of pseudo-labelling and of segmenter prediction: eager PyTorch vs ONNX Runtime.

Both paths run the same networks on the same CamVid-size images (480x360) with the same settings:
for pseudo-labels the classifier's multi-scale CAMs (scales 1, 0.5, 1.5, 2, each with its flip, the
defaults) assembled into labels; for prediction the segmenter's sliding windows with flips. The
eager path is the engine's PyTorch forward as it ran before ONNX Runtime became the CPU default
(``--runtime torch``); the fast one is ``--runtime onnx`` (the CPU default). Timings interleave the
two paths repeat by repeat, so a load change on the machine hits both alike; the best repeat of
each is compared. Outputs must agree within 1e-4 (relative to the output's scale).

    python benchmarks/inference_speed.py                 # CamVid val images from ../shared/data
    python benchmarks/inference_speed.py --images 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "driving" / "CamVid"
RESULTS = ROOT / "benchmarks" / "results" / "inference_speed.md"
TOLERANCE = 1e-4


def load_images(n: int) -> tuple[list[torch.Tensor], str]:
    from wsss_domains.data.io import read_rgb

    files = sorted((CAMVID / "val").glob("*"))[:n]
    if len(files) == n:
        return [read_rgb(f) for f in files], f"{n} CamVid val images ({files[0].name} ...)"
    torch.manual_seed(0)
    return [torch.rand(3, 360, 480) for _ in range(n)], f"{n} random 480x360 images (no CamVid here)"


def timed(fn, images) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    outputs = [fn(x) for x in images]
    return time.perf_counter() - start, outputs


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / max(1.0, float(x.abs().max()))) for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from wsss_domains.cam.extract import CamExtractor
    from wsss_domains.domains import create_domain
    from wsss_domains.models.classifier import CamClassifier
    from wsss_domains.pseudo_labels.assemble import cams_to_labels
    from wsss_domains.segmentation.inference import InferenceOptions, SegmenterPredictor
    from wsss_domains.segmentation.model import SegmenterConfig, build_segmenter
    from wsss_domains.training.data import normalize

    images, source = load_images(args.images)
    domain = create_domain("driving")
    label_space = domain.dataset("camvid").label_space
    mean, std = domain.input_statistics()
    inputs = [normalize(x, mean, std) for x in images]
    present = torch.ones(len(label_space.foreground))
    cache = Path(tempfile.mkdtemp(prefix="wsss-speed-"))

    classifier = CamClassifier(len(label_space.foreground), weights="imagenet").eval()
    eager_cam = CamExtractor(classifier)
    fast_cam = CamExtractor(classifier)
    assert fast_cam.use_runtime("onnx", cache=cache), "the CAM pass could not be exported"

    def pseudo_label(extractor):
        def run(x: torch.Tensor) -> torch.Tensor:
            cams = extractor(x)
            cams_to_labels(cams, present, label_space)
            return cams

        return run

    config = SegmenterConfig("driving", "camvid", list(label_space.classes), mean=mean, std=std)
    segmenter = build_segmenter(config).eval()
    eager_seg = SegmenterPredictor(segmenter, config, InferenceOptions(runtime="torch"))
    fast_seg = SegmenterPredictor(segmenter, config, InferenceOptions(runtime="onnx"), cache=cache)
    jobs = {
        "pseudo-labels (CAMs x4 scales x flip + labels)": (pseudo_label(eager_cam), pseudo_label(fast_cam)),
        "predict (segmenter, 512 windows, flip)": (eager_seg.probabilities, fast_seg.probabilities),
    }
    load = os.getloadavg()
    rows = []
    for name, (eager, fast) in jobs.items():
        with torch.inference_mode():
            timed(eager, inputs[:1]), timed(fast, inputs[:1])  # warm-up: allocators, ORT's first plan
            best = {"eager": float("inf"), "fast": float("inf")}
            for _ in range(args.repeats):
                t, eager_out = timed(eager, inputs)
                best["eager"] = min(best["eager"], t)
                t, fast_out = timed(fast, inputs)
                best["fast"] = min(best["fast"], t)
        error = max_error(eager_out, fast_out)
        eager_ips, fast_ips = len(inputs) / best["eager"], len(inputs) / best["fast"]
        rows.append((name, eager_ips, fast_ips, fast_ips / eager_ips, error))
        print(f"{name}: eager {eager_ips:.3f} img/s, ONNX Runtime {fast_ips:.3f} img/s, "
              f"ratio {fast_ips / eager_ips:.2f}, max relative difference {error:.1e}", flush=True)  # fmt: skip
        if error > TOLERANCE:
            raise SystemExit(f"outputs differ by {error:.1e} > {TOLERANCE}")
    load_after = os.getloadavg()
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"\n{source}; best of {args.repeats} interleaved repeats; {args.threads} threads; {platform.machine()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}; load average (1 min) {load[0]:.2f} before, "
        f"{load_after[0]:.2f} after.",
        "\n| job | eager PyTorch (img/s) | ONNX Runtime (img/s) | ratio | max relative difference |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {e:.3f} | {f:.3f} | **{r:.2f}x** | {d:.1e} |" for n, e, f, r, d in rows]
    lines += ["\nCommand:\n", "```", shlex.join([Path(sys.executable).name, *sys.argv]), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# Inference speed: eager PyTorch vs ONNX Runtime (the CPU default)\n")
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
