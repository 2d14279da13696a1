"""Tiny histology datasets written in their real on-disk layouts, for the histo plugin's tests.

Images are small random RGB arrays; masks are palette PNGs with each dataset's real palette,
and training file names follow each dataset's real label convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WSSS4LUAD_PALETTE = [(0, 64, 128), (64, 128, 0), (243, 152, 0), (255, 255, 255)]
LUAD_PALETTE = [(205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)]
BCSS_PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]


def flat(colours: list[tuple[int, int, int]]) -> list[int]:
    out = [c for rgb in colours for c in rgb]
    return out + [0] * (768 - len(out))


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def save_palette(path: Path, ids: np.ndarray, colours: list[tuple[int, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(flat(colours))
    image.save(path)


def quadrants(h: int, w: int, ids: tuple[int, int, int, int]) -> np.ndarray:
    """A mask with four quadrants: top-left, top-right, bottom-left, bottom-right."""
    mask = np.empty((h, w), dtype=np.uint8)
    mask[: h // 2, : w // 2], mask[: h // 2, w // 2 :] = ids[0], ids[1]
    mask[h // 2 :, : w // 2], mask[h // 2 :, w // 2 :] = ids[2], ids[3]
    return mask


def make_wsss4luad(root: Path) -> Path:
    """WSSS4LUAD layout: 2 training patches, 2 validation and 1 test image with both masks."""
    save_rgb(root / "1.training" / "436219-9328-56427-[1, 1, 0].png", 30, 28, seed=1)
    save_rgb(root / "1.training" / "449636-23526-9666-[0, 0, 1].png", 26, 32, seed=2)
    masks = {
        ("2.validation", "00.png"): quadrants(40, 48, (0, 2, 3, 0)),
        ("2.validation", "01.png"): quadrants(40, 48, (1, 1, 1, 1)),
        ("3.testing", "00.png"): quadrants(40, 48, (1, 2, 2, 3)),
    }
    for (split, name), mask in masks.items():
        save_rgb(root / split / "img" / name, 40, 48, seed=3)
        save_palette(root / split / "mask" / name, mask, WSSS4LUAD_PALETTE)
        background = (mask == 3).astype(np.uint8)
        if (split, name) == ("2.validation", "01.png"):
            background[:4, :] = 1  # background-mask marks a strip the class mask does not
        save_palette(root / split / "background-mask" / name, background, [(0, 0, 0), (255, 255, 255)])
    return root


def make_tissue(root: Path, which: str, train_folder: str = "train", with_train: bool = True) -> Path:
    """LUAD-HistoSeg (``which='luad'``) or BCSS-WSSS (``'bcss'``) layout, 224 px images cut to 32."""
    if which == "luad":
        names = ["1031280-2300-27920-[1 0 0 1].png", "385277-44539-46781-[0 1 1 0].png"]
        palette = LUAD_PALETTE
    else:
        names = [
            "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png",
            "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+1[0010].png",
        ]
        palette = BCSS_PALETTE
    if with_train:
        for i, name in enumerate(names):
            save_rgb(root / train_folder / name, 32, 32, seed=i)
    for split, ids in (("val", (0, 3, 4, 4)), ("test", (1, 2, 2, 0))):
        save_rgb(root / split / "img" / "sample-1.png", 32, 32, seed=5)
        save_palette(root / split / "mask" / "sample-1.png", quadrants(32, 32, ids), palette)
    return root


def make_glas(root: Path) -> Path:
    """GlaS layout: train_1, train_2, testA_1, testB_1 with instance-id annotations (0 background)."""
    root.mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(("train_1", "train_2", "testA_1", "testB_1")):
        save_rgb(root / f"{stem}.bmp", 48, 64, seed=k)
        anno = np.zeros((48, 64), dtype=np.uint8)
        anno[4:20, 4:20] = 1  # gland instance 1
        anno[30:44, 40:60] = 7  # gland instance 7
        Image.fromarray(anno, mode="L").save(root / f"{stem}_anno.bmp")
    return root
