"""Per-domain recipes for one column of the domain-transfer matrix: which data, which hold-out.

Each preset trains on one slice of a domain's development data and scores another slice of the same
data (a hold-out: the two never share an image, see :mod:`wsss_domains.data.splits`), so every
column of the matrix is scored on images its classifier never saw. Paths are relative to a data
root (``../shared/data`` beside the checkout by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsss_domains.cam.extract import DEFAULT_SCALES
from wsss_domains.models.classifier import DEFAULT_BACKBONE


@dataclass(frozen=True)
class CellPreset:
    """How one domain column is trained and scored."""

    domain: str  # domain plugin name
    dataset: str  # loader name within that domain
    path: str  # data folder, relative to the data root
    train_split: str
    score_split: str
    # Train on patches/tiles/crops labelled by the classes in their own mask (the domain's usual
    # protocol when only fully annotated images exist).
    labels_from_masks: bool = False
    # Patch size for labels_from_masks; None: the loader's default (e.g. CamVid's 120x160 crops).
    patch_size: int | None = None
    # Train on this many randomly placed windows per image and epoch instead of the fixed grid.
    random_patches: int | None = None
    # Score tiles of the same size (each with its own image-level labels) instead of whole images:
    # remote-sensing scenes are too large to pseudo-label whole and are labelled tile by tile.
    score_tiles: bool = False
    # Image-level labels for pseudo-labelling derived from the scoring masks (WSSS practice: the
    # image-level labels of the scored images are known).
    score_labels_from_masks: bool = True
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    image_size: int = 224
    batch_size: int = 32
    # Optimiser-step cap on top of the time budget (-1: none); tests use a couple of steps.
    max_steps: int = -1
    scales: tuple[float, ...] = DEFAULT_SCALES
    note: str = ""

    def data(self, root: Path) -> Path:
        return Path(root) / self.path

    def train_options(self) -> dict[str, object]:
        """Loader options of the training split."""
        if not self.labels_from_masks:
            return {}
        options: dict[str, object] = {"labels_from_masks": True, "patch_size": self.patch_size}
        if self.random_patches:
            options["random_patches"] = self.random_patches
        return options

    def score_options(self) -> dict[str, object]:
        """Loader options of the scoring split (identical for pseudo-labelling and evaluation)."""
        if not self.score_tiles:
            return {}
        return {"labels_from_masks": True, "patch_size": self.patch_size}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scales"] = list(self.scales)
        return data


# Splits checked against ../shared/data (see its README): every slice below is non-empty and the
# train and score slices of a preset are disjoint.
DEFAULT_PRESETS: Mapping[str, CellPreset] = {
    "histo": CellPreset(
        domain="histo",
        dataset="wsss4luad",
        path="histo/WSSS4LUAD",
        train_split="validation[0:20]",  # 20 annotated ROIs cut into 224 px patches (native magnification)
        score_split="validation[20:]",  # the other 11 ROIs, scored whole
        labels_from_masks=True,
        patch_size=224,
        note="WSSS4LUAD 2.validation (31 ROIs): tumour, stroma, normal; glass excluded",
    ),
    "driving": CellPreset(
        domain="driving",
        dataset="camvid",
        path="driving/CamVid",
        train_split="train",  # 367 frames cut into 120x160 crops labelled from their masks
        score_split="val",  # 101 frames, scored whole (480x360)
        labels_from_masks=True,
        note="CamVid (SegNet layout): 11 classes, frames from other sequences in val",
    ),
    "remote-sensing": CellPreset(
        domain="remote-sensing",
        dataset="deepglobe",
        path="remote_sensing/deepglobe-sample",
        train_split="train[0:6]",  # 6 scenes of 2448x2448 in 256 px tiles
        score_split="train[6:]",  # the other 2 scenes, scored tile by tile
        labels_from_masks=True,
        patch_size=256,
        score_tiles=True,
        note="DeepGlobe 2018 land cover sample (8 scenes): 6 classes, unknown ignored",
    ),
    "dubai": CellPreset(
        domain="remote-sensing",
        dataset="dubai-aerial",
        path="remote_sensing/dubai-aerial",
        train_split="all[:80%]",  # ids sort tile group by tile group: the last images of tile 5 ...
        score_split="all[80%:]",  # ... are held out, so train and score regions stay apart
        labels_from_masks=True,
        patch_size=256,
        score_tiles=True,
        note="Dubai aerial (tiles 1-5, 45 images): 5 classes + unlabeled ignored",
    ),
    "coco": CellPreset(
        domain="coco",
        dataset="coco",
        path="natural/coco128",
        train_split="train2017[0:48]",  # whole images with their instance-derived image labels
        score_split="train2017[48:]",  # the other 16 images
        note="coco128 (64 images): 80 categories + background by threshold",
    ),
}
