"""Windowed raster pseudo-labelling: peak memory and time against raster size.

``pseudo-labels --raster`` must hold one window at a time, never the raster, so its peak resident
memory should not grow with the raster and its time should grow linearly with the pixel count
(16x from 4096² to 16384²). This measures both:

1. Two synthetic 3-band uint8 GeoTIFFs, 4096² and 16384² (UTM, 0.5 m pixels, 512-pixel deflate
   tiles), are written window by window into a temporary folder: a land-cover-like texture (water,
   forest, fields with furrows, blocky urban, bare soil) whose regions come from smooth noise fields
   of fixed cell sizes, so both rasters share the same statistics. The generator never holds a
   raster either.
2. A run folder is built without training: ``CamClassifier`` (EfficientNet-Lite0 with the packaged
   ImageNet weights) with a seeded random head over DeepGlobe's 6 land-cover classes, saved as
   ``train`` would save it. A random head makes the labels meaningless, not the cost: the network,
   the windows and the writing are those of a trained run, which is all a speed/memory benchmark
   needs.
3. Each raster is pseudo-labelled in a fresh subprocess with the command line, all six classes
   given as labels, default window (1024) and margin (128), default (maxima over the raster, two-pass)
   normalisation, a single CAM scale without flip (``--scale``, default 0.5, so that the 16384²
   raster takes minutes on 2 CPU cores); the child's peak RSS comes from ``os.wait4`` (its own
   ``ru_maxrss``), its wall time from the clock, start-up and model loading included.
4. For the record, the 4096² raster is also run at CAM scale 1 (peak memory of a full-resolution
   window), and with margins 64 and 256 and in per-window normalisation: the share of pixel pairs
   across window seams whose labels differ is compared with the same share across lines through
   window middles (what a seamless map shows everywhere). With a random head the class maps are
   nearly tied, so this exaggerates seams; it still ranks margins and normalisations.

Torch in the children uses ``--threads`` threads (default 1): on a shared, busy machine a second
OpenMP thread mostly waits for a core (a Lite0 forward pass measured 50x slower with 2 threads than
with 1 while other jobs ran); use ``--threads 2`` on an idle machine.

Run: ``.venv/bin/python benchmarks/raster_windowed.py`` (``--record`` appends the figures, the
command, date and machine to ``benchmarks/results/raster_windowed.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from torch import nn

from wsss_domains.reports.environment import cpu_model
from wsss_domains.training.run import RunConfig, build_model, save_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "raster_windowed.md"
CLASSES = ("urban", "agriculture", "rangeland", "forest", "water", "barren")
GB = 1e9
GEN_WINDOW = 1024
# Land-cover types of the texture: base colour, and the cell sizes of their region fields.
COVERS = {
    "water": (40, 70, 90),
    "forest": (40, 80, 40),
    "field": (150, 160, 90),
    "urban": (130, 125, 120),
    "bare": (170, 150, 120),
}
COARSE, FINE = 512, 96


def smooth(grid: np.ndarray, row: int, col: int, h: int, w: int, cell: int) -> np.ndarray:
    """Bilinear interpolation of a coarse random grid at the pixels of one window."""
    y = np.arange(row, row + h, dtype=np.float32) / cell
    x = np.arange(col, col + w, dtype=np.float32) / cell
    iy, ix = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bottom = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


class Texture:
    """A land-cover-like image defined pixel by pixel, so any window can be drawn on its own."""

    def __init__(self, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.coarse = [rng.random((size // COARSE + 2,) * 2, dtype=np.float32) for _ in COVERS]
        self.fine = [rng.random((size // FINE + 2,) * 2, dtype=np.float32) for _ in COVERS]

    def window(self, row: int, col: int, h: int, w: int) -> np.ndarray:
        scores = np.stack(
            [
                smooth(c, row, col, h, w, COARSE) + 0.35 * smooth(f, row, col, h, w, FINE)
                for c, f in zip(self.coarse, self.fine, strict=True)
            ]
        )
        cover = scores.argmax(axis=0)
        rgb = np.array(list(COVERS.values()), dtype=np.float32)[cover].transpose(2, 0, 1)
        ys, xs = np.mgrid[row : row + h, col : col + w]
        rng = np.random.default_rng((self.seed, row, col))
        names = list(COVERS)
        rgb += np.where(cover == names.index("field"), 18 * np.sin(xs * (2 * np.pi / 9.0)), 0)[None]
        rgb += np.where(cover == names.index("urban"), 30 * (((ys // 20) + (xs // 28)) % 2), 0)[None]
        grain = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
        rgb += np.where(cover == names.index("forest"), 14, 4)[None] * grain[None]
        rgb += rng.normal(0.0, 3.0, rgb.shape).astype(np.float32)
        return np.clip(rgb, 0, 255).astype(np.uint8)


def write_raster(path: Path, size: int, seed: int) -> Path:
    texture = Texture(size, seed)
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(400000.0, 5000000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "photometric": "RGB",
    }
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, GEN_WINDOW):
            for col in range(0, size, GEN_WINDOW):
                h, w = min(GEN_WINDOW, size - row), min(GEN_WINDOW, size - col)
                dst.write(texture.window(row, col, h, w), window=Window(col, row, w, h))
    return path


def build_run(
    folder: Path, domain: str = "remote-sensing", dataset: str = "deepglobe", data: Path | None = None
) -> Path:
    """A run folder as ``train`` leaves it, with ImageNet Lite0 and a seeded random 6-class head.

    ``data``: the training folder the run records (needed where the loader's classes live there).
    """
    config = RunConfig(
        domain=domain,
        dataset=dataset,
        classes=list(CLASSES),
        foreground=list(CLASSES),
        weights="imagenet",
        data=None if data is None else str(data),
        split=None if data is None else "all",
    )
    torch.manual_seed(0)
    model = build_model(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder)
    save_model(model, nn.ModuleDict(), folder)
    return folder


def pseudo_label(
    run: Path, raster: Path, out: Path, scale: float, threads: int, extra: list[str]
) -> tuple[float, int, list[str]]:
    """Wall seconds and peak RSS bytes of one fresh `pseudo-labels --raster` process, and its command."""
    cmd = [
        sys.executable,
        "-m",
        "wsss_domains.cli",
        "pseudo-labels",
        "--run",
        str(run),
        "--raster",
        str(raster),
    ]
    cmd += ["--labels", ",".join(CLASSES), "--scales", str(scale), "--no-flip", "--device", "cpu"]
    cmd += ["--no-progress", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{log.read_text()}")
    return seconds, usage.ru_maxrss * 1024, cmd  # ru_maxrss is in KiB on Linux


def seam_rates(path: Path, window: int) -> tuple[float, float]:
    """Shares of neighbouring pixel pairs with different labels: across seams, across mid-window lines."""

    def change_rate(lines: list[int], src: rasterio.DatasetReader) -> float:
        rates = []
        for at in lines:
            cols = src.read(1, window=Window(at - 1, 0, 2, src.height))
            rows = src.read(1, window=Window(0, at - 1, src.width, 2))
            rates += [(cols[:, 0] != cols[:, 1]).mean(), (rows[0] != rows[1]).mean()]
        return float(np.mean(rates)) if rates else float("nan")

    with rasterio.open(path) as src:
        size = min(src.height, src.width)
        seams = list(range(window, size, window))
        middles = list(range(window // 2, size, window))
        return change_rate(seams, src), change_rate(middles, src)


def baseline_rss(threads: int) -> int:
    """Peak RSS of the command line that only builds its parser (`pseudo-labels --help`): imports."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "wsss_domains.cli", "pseudo-labels", "--help"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


HEADER = """# Windowed raster pseudo-labelling: peak memory and time against raster size

`pseudo-labels --raster` on synthetic 3-band uint8 GeoTIFFs of 4096² and 16384² pixels, each in a
fresh process (see `benchmarks/raster_windowed.py` for how the rasters and the run are made: Lite0
with ImageNet weights and a random 6-class head, no training). Peak RSS is the child's
`ru_maxrss` (GB = 10^9 bytes), next to that of the command line doing nothing but start
(`pseudo-labels --help`: the imports of torch and the CLI); times are wall-clock, process start and
model loading included, and in brackets the time inside the pseudo-labelling function alone.
Targets: peak RSS (16384²) <= 1.5 GB, time(16384²)/time(4096²) <= 17 (linear: 16).
"Seams" is the share (%) of neighbouring pixel pairs with different labels across window seams /
across lines through window middles, on the 4096² raster, by normalisation and margin (m): a
seamless map has the same share on both; a random head exaggerates seams (nearly tied class maps).

| date | command | settings | peak RSS 4096² / 16384² (GB) | time 4096² / 16384² (s) | ratio | peak RSS at CAM scale 1, 4096² (GB) | seams (%), across / mid-window | machine |
|---|---|---|---|---|---|---|---|---|
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,16384", help="small,large raster sides")
    parser.add_argument("--scale", type=float, default=0.5, help="the single CAM scale")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the children")
    parser.add_argument("--no-full-scale", action="store_true", help="skip the CAM-scale-1 memory run")
    parser.add_argument("--workdir", type=Path, help="keep rasters and outputs here (default: a temp folder)")
    parser.add_argument("--record", action="store_true", help=f"append the figures to {RESULTS}")
    args = parser.parse_args()
    small, large = (int(v) for v in args.sizes.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="raster-windowed-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), {args.threads} torch thread(s)"
    print(f"machine: {machine}; load average {load_before[0]:.1f}; work folder {work}")
    try:
        rasters = {}
        for size in (small, large):
            start = time.perf_counter()
            rasters[size] = write_raster(work / f"scene-{size}.tif", size, seed=size)
            mb = rasters[size].stat().st_size / 1e6
            print(f"generated {size}² raster ({mb:.0f} MB) in {time.perf_counter() - start:.0f} s")
        run = build_run(work / "run")
        baseline = baseline_rss(args.threads)
        print(
            f"command-line start-up alone (imports, `pseudo-labels --help`): peak RSS {baseline / GB:.2f} GB"
        )
        figures: dict[int, tuple[float, int]] = {}
        inside: dict[int, float] = {}
        commands = {}
        for size in (small, large):
            out = work / f"pl-{size}.tif"
            seconds, rss, cmd = pseudo_label(run, rasters[size], out, args.scale, args.threads, [])
            inner = json.loads(out.with_name(out.name + ".json").read_text())["seconds"]
            figures[size] = (seconds, rss)
            inside[size] = inner
            commands[size] = cmd
            print(f"{size}²: {seconds:.1f} s wall ({inner:.1f} s inside), peak RSS {rss / GB:.2f} GB")
        ratio = figures[large][0] / figures[small][0]
        inside_ratio = inside[large] / inside[small]
        full = None
        if not args.no_full_scale:
            seconds, full, _ = pseudo_label(run, rasters[small], work / "pl-full.tif", 1.0, args.threads, [])
            print(f"{small}² at CAM scale 1: {seconds:.1f} s, peak RSS {full / GB:.2f} GB")
        seams = {("raster", 128): seam_rates(work / f"pl-{small}.tif", 1024)}
        for mode, margin in (("raster", 64), ("raster", 256), ("window", 128)):
            out = work / f"pl-{small}-{mode}-{margin}.tif"
            extra = ["--cam-max-over", mode, "--margin", str(margin)]
            pseudo_label(run, rasters[small], out, args.scale, args.threads, extra)
            seams[mode, margin] = seam_rates(out, 1024)
        print(
            f"label changes between neighbouring pixels, {small}² raster (across seams / across mid-window lines):"
        )
        for (mode, margin), (seam, mid) in sorted(seams.items()):
            print(f"  {mode:<6} normalisation, margin {margin:>3}: {100 * seam:5.1f} % / {100 * mid:4.1f} %")
        load_after = os.getloadavg()
        print(f"peak RSS ({large}²): {figures[large][1] / GB:.2f} GB")
        print(f"time({large}²)/time({small}²): {ratio:.2f}")
        print(f"  (pseudo-labelling alone, start-up and model loading left out: {inside_ratio:.2f})")
        print(f"load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f}")
        if args.record:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            if not RESULTS.exists():
                RESULTS.write_text(HEADER)
            seam_text = ", ".join(
                f"{mode} m{margin}: {100 * seam:.1f} / {100 * mid:.1f}"
                for (mode, margin), (seam, mid) in sorted(seams.items())
            )
            child = " ".join(shlex.quote(a) for a in commands[large][1:]).replace(str(work), "$TMP")
            row = (
                f"| {dt.date.today().isoformat()} "
                f"| `{shlex.join(['.venv/bin/python', 'benchmarks/raster_windowed.py', *sys.argv[1:]])}`; "
                f"each child: `python {child}` "
                f"| window 1024, margin 128, maxima over the raster, CAM scale {args.scale:g}, no flip "
                f"| {figures[small][1] / GB:.2f} / {figures[large][1] / GB:.2f} "
                f"(start-up alone {baseline / GB:.2f}) "
                f"| {figures[small][0]:.1f} / {figures[large][0]:.1f} "
                f"(inside {inside[small]:.1f} / {inside[large]:.1f}) "
                f"| {ratio:.2f} (inside {inside_ratio:.2f}) "
                f"| {'-' if full is None else f'{full / GB:.2f}'} "
                f"| {seam_text} "
                f"| {machine}; torch {torch.__version__}; load average {load_before[0]:.1f} before, "
                f"{load_after[0]:.1f} after |\n"
            )
            with RESULTS.open("a") as fh:
                fh.write(row)
            print(f"appended to {RESULTS}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
