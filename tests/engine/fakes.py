"""A tiny fake domain plugin and the on-disk data it reads, so engine and CLI tests run in seconds.

The ``fake`` domain has one loader, ``shapes``: 32x32 RGB images of a grey background with a red
and/or a blue square, palette masks (0 background, 1 red, 2 blue, 255 ignore) and a background
decided by threshold. On disk::

    root/SHAPES                 marker file: how ``detect`` recognises the layout
    root/classes.txt            instead of the marker, for ``shapes-declared``: class names, background first
    root/<split>/images/<id>.png
    root/<split>/masks/<id>.png     optional; without it (and without labels.json) a sample has no label
    root/<split>/labels.json        optional {id: [red, blue]}; overrides labels derived from masks

``shapes-declared`` reads the same files but declares its classes inside the data folder
(``DatasetSpec.label_space_from``), as the generic folder format does. The loader behaves as a
careful real loader does: errors name the offending file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from wsss_domains.data.io import DataError, check_same_size, read_index_mask, read_rgb
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains import DOMAINS, register_domain
from wsss_domains.domains.contract import BackgroundMode, DatasetSpec, DomainPlugin, LabelSpace, Sample

FAKE_DOMAIN = "fake"
DATASET = "shapes"
DECLARED = "shapes-declared"
MARKER = "SHAPES"
CLASS_FILE = "classes.txt"
SIZE = 32
FAST_BACKBONE = "test_efficientnet"  # timm's ~100k-parameter test model: a training step in ~20 ms

PALETTE = ((128, 128, 128), (255, 0, 0), (0, 0, 255))
LABEL_SPACE = LabelSpace(
    classes=("background", "red", "blue"),
    palette=PALETTE,
    background_mode=BackgroundMode.THRESHOLD,
    background_index=0,
)
# Image colours of each class (not the palette: images are photographs, not masks).
IMAGE_COLOURS = ((120, 120, 120), (230, 20, 20), (20, 20, 230))


class ShapesDataset(Dataset):
    """Samples of one split of the ``shapes`` layout."""

    def __init__(self, folder: Path, label_space: LabelSpace = LABEL_SPACE) -> None:
        self.folder = folder
        self.label_space = label_space
        images = folder / "images"
        if not images.is_dir():
            raise DataError(images, "folder not found")
        self.images = sorted(images.glob("*.png"))
        labels = folder / "labels.json"
        self.labels: dict[str, list[float]] = json.loads(labels.read_text()) if labels.is_file() else {}

    def __len__(self) -> int:
        return len(self.images)

    def mask_path(self, index: int) -> Path:
        return self.folder / "masks" / self.images[index].name

    def __getitem__(self, index: int) -> Sample:
        path = self.images[index]
        sample: Sample = {"image": read_rgb(path), "id": path.stem, "meta": {"path": str(path)}}
        mask_path = self.mask_path(index)
        if mask_path.is_file():
            mask = read_index_mask(mask_path)
            check_same_size(sample["image"], mask, mask_path)
            try:
                sample["label"] = self.label_space.label_from_mask(mask)
            except ValueError as exc:
                raise DataError(mask_path, str(exc)) from exc
            sample["mask"] = mask
        if path.stem in self.labels:
            sample["label"] = torch.tensor(self.labels[path.stem], dtype=torch.float32)
        return sample


def _build(
    root: Path, split: str, label_space: LabelSpace, labels_from_masks: bool, patch_size: int | None
) -> Dataset:
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(folder, f"split '{split}' not found")
    dataset = ShapesDataset(folder, label_space)
    if labels_from_masks:
        return PatchDataset(dataset, label_space, patch_size or SIZE // 2)
    return dataset


def build(
    root: Path, split: str, labels_from_masks: bool = False, patch_size: int | None = None, **_: object
) -> Dataset:
    return _build(root, split, LABEL_SPACE, labels_from_masks, patch_size)


def read_declared(root: Path) -> LabelSpace:
    """The label space named in ``classes.txt``: background first, colours from the fixed palette."""
    path = Path(root) / CLASS_FILE
    if not path.is_file():
        raise DataError(path, "class file not found")
    names = tuple(path.read_text().split())
    return LabelSpace(names, PALETTE[: len(names)], BackgroundMode.THRESHOLD, background_index=0)


def build_declared(
    root: Path, split: str, labels_from_masks: bool = False, patch_size: int | None = None, **_: object
) -> Dataset:
    return _build(root, split, read_declared(root), labels_from_masks, patch_size)


SPEC = DatasetSpec(
    name=DATASET,
    label_space=LABEL_SPACE,
    build=build,
    detect=lambda root: (Path(root) / MARKER).is_file(),
    splits=("train", "val", "unlabelled"),
    description="fake coloured squares for engine tests",
    default_split="train",
    patch_size=SIZE // 2,
)
DECLARED_SPEC = DatasetSpec(
    name=DECLARED,
    label_space=LabelSpace(("<declared in classes.txt>",), ((0, 0, 0),)),
    build=build_declared,
    detect=lambda root: (Path(root) / CLASS_FILE).is_file(),
    splits=SPEC.splits,
    description="fake coloured squares whose classes are declared in the data folder",
    default_split="train",
    patch_size=SIZE // 2,
    label_space_from=read_declared,
)


class FakeDomain(DomainPlugin):
    """Two foreground classes (red, blue) and a threshold-decided background."""

    name = FAKE_DOMAIN
    description = "fake domain for engine tests"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {DATASET: SPEC, DECLARED: DECLARED_SPEC}


def register() -> None:
    register_domain(FakeDomain)


def unregister() -> None:
    DOMAINS.unregister(FAKE_DOMAIN)


def pseudo_labelled_run(folder: Path, *pseudo_label_options: str) -> tuple[Path, Path, Path]:
    """``(data, run, pseudo-labels)``: a shapes dataset, a classifier trained two steps on its train split
    with the tiny test backbone, and that split's pseudo-labels (the start of every segmenter test)."""
    from wsss_domains.cli import main

    root = write_shapes(folder / "data", n_train=4, n_val=2)
    run, pl = folder / "run", folder / "pl"
    fast = ["--backbone", FAST_BACKBONE, "--weights", "random", "--image-size", "32", "--batch-size", "2"]
    fast += ["--max-steps", "2", "--device", "cpu", "--no-progress"]
    assert main(["train", "--domain", FAKE_DOMAIN, "--data", str(root), "--out", str(run), *fast]) == 0
    args = ["pseudo-labels", "--run", str(run), "--data", str(root), "--split", "train", "--out", str(pl)]
    assert main([*args, "--no-progress", *pseudo_label_options]) == 0
    return root, run, pl


@pytest.fixture(scope="module")
def fake_domain() -> Iterator[None]:
    """The fake domain registered for one test module: ``pytestmark = pytest.mark.usefixtures("fake_domain")``
    with ``from fakes import fake_domain``."""
    register()
    yield
    unregister()


# -- on-disk fixture data --------------------------------------------------------------------


def shapes_mask(seed: int, size: int = SIZE) -> np.ndarray:
    """Background with a red square, a blue square or both, by ``seed``: every label combination occurs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=np.uint8)
    present = [(True, False), (False, True), (True, True)][seed % 3]
    half = size // 2
    for cls, (on, x0) in enumerate(zip(present, (0, half), strict=True), start=1):
        if on:
            side = int(rng.integers(size // 4, half))
            y = int(rng.integers(0, size - side))
            x = x0 + int(rng.integers(0, half - side + 1))
            mask[y : y + side, x : x + side] = cls
    return mask


def render(mask: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    rgb = np.zeros((*mask.shape, 3), dtype=np.float64)
    for cls, colour in enumerate(IMAGE_COLOURS):
        rgb[mask == cls] = colour
    rgb += rng.normal(0.0, 8.0, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_mask(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(LABEL_SPACE.flat_palette())
    image.save(path)


def save_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_split(root: Path, split: str, n: int, masks: bool = True, first_seed: int = 0) -> list[str]:
    """``n`` images (and masks) of one split; returns their ids."""
    ids = []
    for k in range(n):
        seed = first_seed + k
        name = f"{split}_{k:02d}"
        mask = shapes_mask(seed)
        save_image(root / split / "images" / f"{name}.png", render(mask, seed))
        if masks:
            save_mask(root / split / "masks" / f"{name}.png", mask)
        ids.append(name)
    return ids


def write_shapes(
    root: Path, n_train: int = 6, n_val: int = 3, n_unlabelled: int = 2, declared: bool = False
) -> Path:
    """The ``shapes`` layout (or ``shapes-declared``): annotated train and val splits, an unannotated one."""
    root.mkdir(parents=True, exist_ok=True)
    if declared:
        (root / CLASS_FILE).write_text("\n".join(LABEL_SPACE.classes) + "\n")
    else:
        (root / MARKER).write_text("fake shapes dataset\n")
    write_split(root, "train", n_train, first_seed=0)
    write_split(root, "val", n_val, first_seed=100)
    write_split(root, "unlabelled", n_unlabelled, masks=False, first_seed=200)
    return root
