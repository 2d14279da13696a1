"""The gallery's pictures: a split's images with their ground truth and label maps blended over them.

Each panel is made at most :data:`PANEL_PIXELS` wide before blending, so a page stays small and a
large image costs one downscale rather than full-size compositing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsss_domains.data.io import read_index_mask
from wsss_domains.data.splits import sample_ids
from wsss_domains.domains.contract import LabelSpace
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.reports.html import Colour, GalleryItem

PANEL_PIXELS = 320
LABEL_ALPHA = 0.55
HEAT_MAPS = "per-class CAM heat maps"


def colours(label_space: LabelSpace) -> dict[str, Colour]:
    """Class name -> its palette colour, for legends and swatches."""
    palette = np.asarray(label_space.flat_palette(), dtype=np.int64).reshape(-1, 3)
    return {
        name: (int(r), int(g), int(b)) for name, (r, g, b) in zip(label_space.classes, palette, strict=False)
    }


def _shrunk_size(width: int, height: int, limit: int = PANEL_PIXELS) -> tuple[int, int]:
    if width <= limit:
        return width, height
    return limit, max(1, round(height * limit / width))


def blend(
    rgb: np.ndarray, ids: np.ndarray, label_space: LabelSpace, alpha: float = LABEL_ALPHA
) -> np.ndarray:
    """Label colours over ``rgb`` (``H x W x 3`` float 0..255); ignored pixels stay bare."""
    palette = np.asarray(label_space.flat_palette(), dtype=np.float32).reshape(-1, 3)
    scored = ids != label_space.ignore_index
    tints = palette[np.where(scored, ids, 0).clip(0, len(palette) - 1)]
    return np.where(scored[..., None], (1 - alpha) * rgb + alpha * tints, rgb)


def _heat_maps(folder: Path, sample_id: str, full_width: int, size: tuple[int, int]) -> Image.Image | None:
    """The per-class heat maps of a pseudo-label overlay picture (image | label | one map per class),
    without its first two panels, scaled like the other panels; None when there is no such picture."""
    path = folder / "overlays" / pred_filename(sample_id)
    if not path.is_file():
        return None
    with Image.open(path) as picture:
        picture = picture.convert("RGB")
    panel = full_width
    if picture.width < 3 * panel or picture.width % panel:
        return None  # not one panel per class at this image's size (e.g. a downsampled raster overview)
    strip = picture.crop((2 * panel, 0, picture.width, picture.height))
    scale = size[0] / panel
    return strip.resize((max(1, round(strip.width * scale)), max(1, round(strip.height * scale))))


def sample_panels(
    sample: Mapping[str, Any],
    label_space: LabelSpace,
    folders: Mapping[str, Path],
    heat_maps: Path | None = None,
) -> list[tuple[str, Image.Image]]:
    """Titled panels of one sample: the image, its ground truth (where it has a mask), each folder's
    labels blended over it (where the file exists), and the CAM heat maps of ``heat_maps``' overlays."""
    image = sample["image"]
    rgb_full = (np.asarray(image.permute(1, 2, 0)) * 255).clip(0, 255).astype(np.uint8)
    height, width = rgb_full.shape[:2]
    size = _shrunk_size(width, height)
    rgb = np.asarray(Image.fromarray(rgb_full).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)

    def small(ids: Any) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return np.asarray(Image.fromarray(ids.astype(np.int32)).resize(size, Image.Resampling.NEAREST))

    panels = [("image", Image.fromarray(rgb.astype(np.uint8)))]
    maps: dict[str, Any] = {}
    if sample.get("mask") is not None:
        maps["ground truth"] = sample["mask"]
    for title, folder in folders.items():
        path = Path(folder) / pred_filename(str(sample["id"]))
        if path.is_file():
            maps[title] = read_index_mask(path)
    for title, ids in maps.items():
        panels.append((title, Image.fromarray(blend(rgb, small(ids), label_space).astype(np.uint8))))
    if heat_maps is not None:
        strip = _heat_maps(Path(heat_maps), str(sample["id"]), width, size)
        if strip is not None:
            panels.append((HEAT_MAPS, strip))
    return panels


def gallery_items(
    dataset: Any,
    label_space: LabelSpace,
    folders: Mapping[str, Path],
    ranked: Sequence[tuple[str, float | None]],
    heat_maps: Path | None = None,
) -> list[GalleryItem]:
    """Gallery items for the samples ``ranked`` names, in that order (ids not in ``dataset`` skipped)."""
    index = {sample_id: i for i, sample_id in enumerate(sample_ids(dataset))}
    items = []
    for sample_id, value in ranked:
        if sample_id not in index:
            continue
        sample = dataset[index[sample_id]]
        items.append(GalleryItem(sample_id, value, sample_panels(sample, label_space, folders, heat_maps)))
    return items


def first_images(dataset: Any, limit: int) -> list[tuple[str, float | None]]:
    """The first ``limit`` samples, unscored: the gallery of a split without masks."""
    return [(sample_id, None) for sample_id in sample_ids(dataset)[:limit]]
