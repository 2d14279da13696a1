"""A tiny synthetic dataset in the folder format: red squares and blue disks on grey noise.

Small and learnable in a few steps, so the engine's ``--demo`` and tests can run end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("background", "square", "disk")
COLORS = {"square": (220, 40, 40), "disk": (40, 60, 220)}


def _draw(rng: np.random.Generator, size: int, present: list[str]) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(128, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for name in present:
        r = int(rng.integers(size // 8, size // 4))
        cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
        if name == "square":
            region = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        else:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[region] = COLORS[name]
        mask[region] = CLASSES.index(name)
    return image, mask


def write_demo(root: Path, count: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` images with masks, labels.csv and train/val splits under ``root``."""
    root = Path(root)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(
        json.dumps(
            {
                "classes": ["background", {"name": "square", "color": list(COLORS["square"])}, "disk"],
                "background": "background",
            },
            indent=2,
        )
    )
    rng = np.random.default_rng(seed)
    rows, names = ["image,labels"], []
    choices = [["square"], ["disk"], ["square", "disk"]]
    for i in range(count):
        present = choices[i % len(choices)]
        image, mask = _draw(rng, size, present)
        name = f"demo_{i:03d}"
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{name}.png")
        labels = [c for c in CLASSES[1:] if (mask == CLASSES.index(c)).any()]
        rows.append(f"{name}.png,{';'.join(labels)}")
        names.append(name)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cut = max(1, (2 * count) // 3)
    (root / "splits" / "train.txt").write_text("\n".join(names[:cut]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(names[cut:]) + "\n")
    return root
