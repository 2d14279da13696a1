"""CAM overlay pictures: the image, its pseudo-label, and one heat map per present class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from wsss_domains.data.io import atomic_write

_JET = colormaps["jet"]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    cams: np.ndarray,
    class_names: Sequence[str],
    palette: list[int],
    alpha: float = 0.5,
    label_title: str = "pseudo-label",
) -> Image.Image:
    """One row: image | labels blended on the image | a jet heat map per class in ``cams``.

    ``image`` is ``H x W x 3`` in [0, 1]; ``labels`` ``H x W`` class ids; ``cams`` ``K x H x W``
    in [0, 1], one per name in ``class_names``.
    """
    rgb = _to_uint8(image)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[labels]
    blended = (rgb * (1 - alpha) + colours * alpha).astype(np.uint8)
    panels = [rgb, blended]
    for cam in cams:
        heat = _to_uint8(_JET(cam)[..., :3])
        panels.append((rgb * (1 - alpha) + heat * alpha).astype(np.uint8))
    h, w = labels.shape
    caption = 14
    canvas = Image.new("RGB", (w * len(panels), h + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ["image", label_title, *class_names]
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        canvas.paste(Image.fromarray(panel), (i * w, caption))
        draw.text((i * w + 2, 1), title, fill=(0, 0, 0))
    return canvas


def save_overlay(path: Path, picture: Image.Image) -> None:
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
