"""Peak memory of `wsss-domains predict --raster` on a 16384² GeoTIFF: bounded by the window.

Writes a tiled, compressed 3-band GeoTIFF of the given size (smooth random land-cover-like
texture, written strip by strip so this script itself stays small), saves a DeepLabV3+
segmenter with the packaged ImageNet encoder (the head is untrained: memory and time do not depend
on what the network learnt), then runs the real command in a child process and reads its peak
resident memory (``ru_maxrss`` of the child). Target: at most 1.5 GB at 16384². A second, smaller
raster shows that the peak does not grow with the raster.

    python benchmarks/predict_raster_memory.py                    # 16384² and 4096²
    python benchmarks/predict_raster_memory.py --sizes 2048 --no-record
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "predict_raster_memory.md"
TARGET_GB = 1.5


def write_raster(path: Path, size: int, strip: int = 512) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32633",
                   transform=from_origin(500000.0, 4000000.0, 0.5, 0.5), BIGTIFF="IF_SAFER")  # fmt: skip
    coarse = rng.uniform(40, 220, (size // 256 + 2, size // 256 + 2, 3)).astype(np.float32)
    cols = np.minimum(np.arange(size) // 256, coarse.shape[1] - 1)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, strip):
            rows = np.minimum(np.arange(row, min(size, row + strip)) // 256, coarse.shape[0] - 1)
            block = coarse[rows][:, cols] + rng.normal(0, 12, (len(rows), size, 3)).astype(np.float32)
            data = np.clip(block, 0, 255).astype(np.uint8)
            dst.write(np.moveaxis(data, -1, 0), window=rasterio.windows.Window(0, row, size, len(rows)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16384,4096")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="extra arguments for `predict`, e.g. '--no-flip'")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    from wsss_domains.domains import create_domain
    from wsss_domains.segmentation.model import SegmenterConfig, build_segmenter, save_segmenter

    work = Path(tempfile.mkdtemp(prefix="wsss-raster-mem-"))
    seg = work / "segmenter"
    space = create_domain("remote-sensing").dataset("deepglobe").label_space
    config = SegmenterConfig("remote-sensing", "deepglobe", list(space.classes))
    save_segmenter(build_segmenter(config), config, seg)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        raster = work / f"scene-{size}.tif"
        write_raster(raster, size)
        out = work / f"pred-{size}.tif"
        cmd = [sys.executable, "-m", "wsss_domains.cli", "predict", "--model", str(seg), "--raster", str(raster),
               "--out", str(out), "--device", "cpu", "--no-progress", *shlex.split(args.extra)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        child = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"failed: {shlex.join(cmd)}")
        peak_note = ""
        gb = usage.ru_maxrss / 1024**2
        rows.append((size, gb, seconds, peak_note, shlex.join(["wsss-domains", *cmd[3:]])))
        print(f"{size}x{size}: peak RSS {gb:.2f} GB{peak_note}, {seconds / 60:.1f} min", flush=True)
        raster.unlink()
    load = os.getloadavg()
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"\nDeepLabV3+ / EfficientNet-Lite0 segmenter, default windows (1024 + 128 margin, network windows 512, "
        f"flip); {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; load average (1 min) "
        f"{load[0]:.2f} at the end. Peak resident memory of the whole `predict` process (its imports alone "
        f"take about 0.95 GB). Target at 16384²: <= {TARGET_GB} GB.",
        "\n| raster | peak RSS (GB) | time (min) |",
        "|---|---|---|",
    ]
    lines += [f"| {s}x{s} | **{gb:.2f}**{n} | {t / 60:.1f} |" for s, gb, t, n, _ in rows]
    lines += ["\nCommands (the segmenter and rasters are made by the script):\n", "```"]
    lines += [f"python {shlex.join(sys.argv)}"] + [c for *_, c in rows] + ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# Segmenter prediction of large rasters: peak memory\n")
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
