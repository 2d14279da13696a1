"""Pseudo-labelling one ordinary large image file: peak memory and time against its pixel count.

An image file (not a GeoTIFF) of 12000² pixels used to be decoded whole, with its normalised
copy and K full-size maps per scale: 8.75 GB at one scale before it crashed. Above
``--max-image-pixels`` (default 2048²) the folder loader's images now go window by window through
the raster engine. This measures, each in a fresh ``pseudo-labels`` process at the command line's
defaults (CAM scales 1, 0.5, 1.5, 2 with flips, ONNX Runtime on the CPU):

1. A folder dataset per size (``classes.json`` with DeepGlobe's six land-cover classes,
   ``labels.csv`` giving all six, ``images/scene.png``): the land-cover texture of
   ``raster_windowed.py`` saved as an RGB PNG of 3000² and of 12000² pixels.
2. A run folder without training: EfficientNet-Lite0 with the packaged ImageNet weights and a seeded
   random 6-class head (a random head changes the labels, not the cost).
3. ``python -m wsss_domains.cli pseudo-labels --run RUN --data DATA --out OUT`` per size; the child's
   peak RSS from ``os.wait4`` (``ru_maxrss``) and its wall time; also a 256² image (labelled whole),
   whose time is the process's start-up and model loading, subtracted for the second ratio.

Targets (reliability issue): peak RSS (12000²) <= 2 GB; time(12000²) / time(3000²) <= 17 (16 is
linear). Run on a quiet machine: ``.venv/bin/python benchmarks/large_image.py --record``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from raster_windowed import CLASSES, GEN_WINDOW, Texture, build_run

from wsss_domains.reports.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "large_image.md"
GB = 1e9


def write_dataset(folder: Path, size: int, seed: int) -> Path:
    """A folder dataset holding one ``size``² RGB PNG with all six classes as its labels."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps({"classes": list(CLASSES)}))
    (folder / "labels.csv").write_text("image,labels\nscene.png," + ";".join(CLASSES) + "\n")
    texture = Texture(size, seed)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    for row in range(0, size, GEN_WINDOW):
        for col in range(0, size, GEN_WINDOW):
            h, w = min(GEN_WINDOW, size - row), min(GEN_WINDOW, size - col)
            pixels[row : row + h, col : col + w] = texture.window(row, col, h, w).transpose(1, 2, 0)
    Image.fromarray(pixels).save(folder / "images" / "scene.png", compress_level=1)
    return folder


def pseudo_label(run: Path, data: Path, out: Path) -> tuple[float, int, list[str], str]:
    """Wall seconds, peak RSS bytes, command and output of one fresh `pseudo-labels` process."""
    cmd = [sys.executable, "-m", "wsss_domains.cli", "pseudo-labels", "--run", str(run), "--data", str(data)]
    cmd += ["--device", "cpu", "--no-progress", "--out", str(out)]
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({code}):\n{log.read_text()}")
    return seconds, usage.ru_maxrss * 1024, cmd, log.read_text()


HEADER = """# Pseudo-labelling one large ordinary image file: peak memory and time against its size

`pseudo-labels --data` on a folder dataset holding one RGB PNG, at the command line's defaults
(CAM scales 1, 0.5, 1.5, 2, flips, ONNX Runtime), each size in a fresh process; see
`benchmarks/large_image.py` for the images (a land-cover texture) and the run (Lite0 with ImageNet
weights, random 6-class head, no training). Peak RSS is the child's `ru_maxrss` (GB = 10^9 bytes);
times are wall-clock with process start and model loading; "net" subtracts the time of the same
command on a 256² image (start-up, model loading, ONNX export cache). Targets: peak RSS (12000²)
<= 2 GB; time(12000²) / time(3000²) <= 17 (16 is linear).

| date | command | peak RSS 256² / 3000² / 12000² (GB) | time 256² / 3000² / 12000² (s) | ratio 12000²/3000², wall (net) | machine |
|---|---|---|---|---|---|
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3000,12000", help="small,large image side in pixels")
    parser.add_argument("--record", action="store_true", help=f"append the figures to {RESULTS}")
    parser.add_argument(
        "--keep", type=Path, help="work in this folder and keep it (default: a temporary one)"
    )
    args = parser.parse_args()
    small, large = (int(v) for v in args.sizes.split(","))
    work = args.keep or Path(tempfile.mkdtemp(prefix="large-image-"))
    work.mkdir(parents=True, exist_ok=True)
    for size in (256, small, large):
        data = work / f"data-{size}"
        if not (data / "images" / "scene.png").is_file():
            print(f"writing a {size}² PNG ...", flush=True)
            write_dataset(data, size, seed=size)
    run = build_run(work / "run", "custom", "folder", work / "data-256")
    load_before = os.getloadavg()[0]
    figures: dict[int, tuple[float, int]] = {}
    command = ""
    for size in (256, small, large):
        data = work / f"data-{size}"
        out = work / f"pl-{size}"
        seconds, rss, cmd, text = pseudo_label(run, data, out)
        figures[size] = (seconds, rss)
        command = shlex.join(cmd).replace(str(work), "$WORK")
        windowed = "window by window" in text
        print(f"{size}²: {seconds:.1f} s, peak RSS {rss / GB:.2f} GB, windowed: {windowed}", flush=True)
    load_after = os.getloadavg()[0]
    start = figures[256][0]
    ratio = figures[large][0] / figures[small][0]
    net = (figures[large][0] - start) / (figures[small][0] - start)
    print(f"peak RSS {large}²: {figures[large][1] / GB:.2f} GB (target <= 2)")
    print(f"time ratio {large}²/{small}²: {ratio:.2f} wall, {net:.2f} net of start-up (target <= 17)")
    if not args.record:
        return
    if not RESULTS.is_file():
        RESULTS.write_text(HEADER)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), {torch.get_num_threads()} torch "
        f"thread(s); torch {torch.__version__}; load average {load_before:.1f} before, {load_after:.1f} after"
    )
    rss = " / ".join(f"{figures[s][1] / GB:.2f}" for s in (256, small, large))
    times = " / ".join(f"{figures[s][0]:.1f}" for s in (256, small, large))
    row = (
        f"| {dt.date.today()} | `.venv/bin/python benchmarks/large_image.py --record`; each child: `{command}` "
        f"| {rss} | {times} | {ratio:.2f} ({net:.2f}) | {machine} |\n"
    )
    with RESULTS.open("a") as fh:
        fh.write(row)
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
