"""Speed-up of a re-run over the same images thanks to the SAM embedding cache, on LiteMedSAM.

Embeds a handful of images twice through SamSegmenter.embed (preprocessing + content hash +
encoder or cache read): the first pass fills an empty cache, the second reads it. Prints the
ratio and appends it, with the command, to benchmarks/results/sam_embedding_cache.md.

    .venv/bin/python benchmarks/sam_embedding_cache.py [--images 6] [--data DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wsss_domains.data.io import read_rgb
from wsss_domains.sam import EmbeddingCache, SamSegmenter, create_sam

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "histo" / "WSSS4LUAD"
RESULTS = REPO / "benchmarks" / "results" / "sam_embedding_cache.md"


def load_images(data: Path, n: int) -> tuple[list[torch.Tensor], str]:
    """Real WSSS4LUAD images (not their masks) when present, else generated smooth images."""
    paths = sorted(p for p in data.rglob("*.png") if "mask" not in p.parent.name) if data.is_dir() else []
    if paths:
        return [read_rgb(p) for p in paths[:n]], f"WSSS4LUAD ({data})"
    gen = torch.Generator().manual_seed(0)
    images = []
    for i in range(n):
        size = (200 + 13 * i, 260 - 7 * i)
        images.append(F.interpolate(torch.rand(1, 3, 16, 16, generator=gen), size, mode="bilinear")[0])
    return images, "generated (no WSSS4LUAD found)"


def timed_pass(segmenter: SamSegmenter, images: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    embeddings = [segmenter.embed(image).clone() for image in images]
    return time.perf_counter() - start, embeddings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--min-ratio", type=float, default=10.0, help="exit 1 below this speed-up")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, source = load_images(args.data, args.images)
    sam = create_sam("lite_medsam")
    with tempfile.TemporaryDirectory(prefix="sam-cache-bench-") as root:
        first_cache = EmbeddingCache(root)
        first, cold = timed_pass(SamSegmenter(sam, cache=first_cache), images)
        rerun_cache = EmbeddingCache(root)  # a new run: only the disk is shared
        second, warm = timed_pass(SamSegmenter(sam, cache=rerun_cache), images)
    if first_cache.misses != len(images) or rerun_cache.hits != len(images):
        raise RuntimeError(
            f"expected {len(images)} misses then hits, got {first_cache.misses} / {rerun_cache.hits}"
        )
    if not all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True)):
        raise RuntimeError("cached embeddings differ from the computed ones")
    ratio = first / second
    print(
        f"LiteMedSAM embeddings of {len(images)} images, {source}: first pass {first:.2f} s,"
        f" re-run {second:.3f} s, speed-up {ratio:.1f}x"
    )

    command = " ".join(
        shlex.quote(a) for a in [".venv/bin/python", "benchmarks/sam_embedding_cache.py", *sys.argv[1:]]
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.results.exists():
        args.results.write_text(
            "# SAM embedding cache: re-run speed-up (LiteMedSAM)\n\n"
            "First pass encodes every image and fills an empty cache; the re-run reads the cache.\n\n"
            "| date | command | images | first pass (s) | re-run (s) | speed-up | machine |\n"
            "|---|---|---|---|---|---|---|\n"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {args.threads} torch threads, {os.cpu_count()} cpus"
    )
    row = (
        f"| {datetime.date.today().isoformat()} | `{command}` | {len(images)}, {source} |"
        f" {first:.2f} | {second:.3f} | {ratio:.1f}x | {machine} |\n"
    )
    with args.results.open("a") as handle:
        handle.write(row)
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    raise SystemExit(main())
