"""The files of a scaffolded domain-plugin package, as ``string.Template`` texts.

Placeholders: ``$name`` (entry-point / domain name), ``$package`` (import name), ``$dist``
(distribution name), ``$class_name`` (plugin class). Kept as Python strings rather than data
files so the scaffold works from any installation of wsss-domains.
"""

from __future__ import annotations

PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "wsss-domains plugin for the '$name' domain"
requires-python = ">=3.10"
dependencies = ["wsss-domains"]

# This entry point is what makes `wsss-domains --domain $name` find the plugin.
[project.entry-points."wsss_domains.domains"]
"$name" = "$package:$class_name"

[tool.setuptools]
packages = ["$package"]

[tool.setuptools.package-data]
$package = ["prompts.json"]

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.ruff]
line-length = 110
"""

README = """# $dist

A wsss-domains plugin package registering the domain `$name`.

```bash
pip install -e .                 # registers the entry point
pytest                           # runs tests/ on a generated fixture
python -c "from $package.demo import write_demo; write_demo('demo-data')"
wsss-domains train --domain $name --data demo-data --split train ...
```

Edit `$package/loader.py` for your data layout, the classes in `LABEL_SPACE`, the hooks in
`$package/plugin.py`, the CLIP vocabulary in `$package/prompts.json` and the extra score in
`$package/metrics.py`. See wsss-domains' docs/writing-a-plugin.md for the contract.
"""

INIT = '''"""wsss-domains plugin for the '$name' domain."""

from $package.plugin import $class_name

__all__ = ["$class_name"]
'''

LOADER = '''"""Loader for a simple folder layout: images/<stem>.png, masks/<stem>.png, splits/<split>.txt.

Masks are grey PNGs holding class ids (indices into LABEL_SPACE.classes; 255 = not scored). The
image-level label of an image is the set of foreground classes present in its mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsss_domains.data.io import DataError, check_same_size, read_index_mask, read_rgb
from wsss_domains.data.patches import PatchDataset
from wsss_domains.domains import BackgroundMode, LabelSpace, Sample

if TYPE_CHECKING:  # types only: `wsss-domains domains` lists this plugin without loading torch
    from torch import Tensor

NAME = "folder"
SPLITS = ("train", "val", "all")
PATCH_SIZE = 64

LABEL_SPACE = LabelSpace(
    classes=("background", "square", "disk"),
    palette=((0, 0, 0), (220, 40, 40), (40, 60, 220)),
    background_mode=BackgroundMode.THRESHOLD,
    background_index=0,
)


class FolderDataset:
    """One sample per image stem: image, mask and the label derived from the mask.

    A map-style dataset (``__len__``, ``__getitem__``): all torch's DataLoader needs.
    """

    def __init__(self, root: Path, stems: list[str]) -> None:
        self.root = root
        self.stems = stems
        self.label_space = LABEL_SPACE

    def __len__(self) -> int:
        return len(self.stems)

    def sample_ids(self) -> list[str]:
        """The ids in index order, so slicing a split (train[0:6], folds) decodes no image."""
        return list(self.stems)

    def load_mask(self, index: int) -> Tensor:
        """The mask alone, so PatchDataset can index patches without decoding images."""
        path = self.root / "masks" / f"{self.stems[index]}.png"
        mask = read_index_mask(path)
        bad = (mask >= LABEL_SPACE.num_classes) & (mask != LABEL_SPACE.ignore_index)
        if bad.any():
            raise DataError(path, f"holds class id {int(mask[bad][0])}, not a class of this domain")
        return mask

    def __getitem__(self, index: int) -> Sample:
        stem = self.stems[index]
        image = read_rgb(self.root / "images" / f"{stem}.png")
        mask = self.load_mask(index)
        check_same_size(image, mask, self.root / "masks" / f"{stem}.png")
        return {
            "image": image,
            "mask": mask,
            "label": LABEL_SPACE.label_from_mask(mask),
            "id": stem,
            "meta": {"dataset": NAME},
        }


def stems_of(root: Path, split: str) -> list[str]:
    """Image stems of a split: splits/<split>.txt, or every image for 'all'."""
    if split == "all":
        return sorted(p.stem for p in (root / "images").glob("*.png"))
    list_file = root / "splits" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(list_file, f"split list not found; known splits: {', '.join(SPLITS)}")
    return [line.strip() for line in list_file.read_text().splitlines() if line.strip()]


def build(
    root: Path, split: str, labels_from_masks: bool = False, patch_size: int | None = None, **_: object
) -> FolderDataset | PatchDataset:
    """Samples of one split; mask-labelled patches with ``labels_from_masks``."""
    root = Path(root)
    dataset = FolderDataset(root, stems_of(root, split))
    if len(dataset) == 0:
        raise DataError(root, f"split '{split}' holds no images")
    if labels_from_masks:
        return PatchDataset(dataset, LABEL_SPACE, patch_size or PATCH_SIZE)
    return dataset


def detect(root: Path) -> bool:
    root = Path(root)
    return (root / "images").is_dir() and (root / "masks").is_dir()
'''

METRICS = '''"""An extra score reported next to the engine's mIoU: mean class accuracy (per-class recall)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_domains.domains import LabelSpace, MetricResult

if TYPE_CHECKING:
    from torch import Tensor


def mean_class_accuracy(confusion: Tensor, label_space: LabelSpace) -> MetricResult:
    """Fraction of each class's pixels predicted as that class (rows ground truth, columns prediction)."""
    conf = confusion.double()
    totals = conf.sum(dim=1)
    per_class = {}
    for i, name in enumerate(label_space.classes):
        if totals[i] > 0:
            per_class[name] = float(conf[i, i] / totals[i])
    value = sum(per_class.values()) / len(per_class) if per_class else float("nan")
    return MetricResult(name="mean_class_accuracy", value=value, per_class=per_class)
'''

DEMO = '''"""A tiny synthetic dataset in this plugin's layout: red squares and blue disks on grey noise.

``write_demo(root)`` is what the tests and ``wsss-domains ... --demo`` use; it is deterministic
for a given seed and takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from $package.loader import LABEL_SPACE


def write_demo(root: Path | str, count: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` image/mask pairs and train/val split lists under ``root``."""
    root = Path(root)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    stems = []
    for i in range(count):
        image = rng.normal(128, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        for cls in (1, 2) if i % 3 == 2 else ((i % 3) + 1,):
            r = int(rng.integers(size // 8, size // 4))
            cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
            if LABEL_SPACE.classes[cls] == "square":
                region = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            else:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[region] = LABEL_SPACE.palette[cls]
            mask[region] = cls
        stem = f"demo_{i:03d}"
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{stem}.png")
        stems.append(stem)
    cut = max(1, (2 * count) // 3)
    (root / "splits" / "train.txt").write_text("\\n".join(stems[:cut]) + "\\n")
    (root / "splits" / "val.txt").write_text("\\n".join(stems[cut:]) + "\\n")
    return root
'''

PLUGIN = '''"""The '$name' domain plugin: datasets plus the hooks that differ from the engine's defaults."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_domains.domains import ClipPrompts, DatasetSpec, DemoData, DomainPlugin, LabelSpace, MetricResult

from $package import loader
from $package.demo import write_demo
from $package.metrics import mean_class_accuracy

if TYPE_CHECKING:
    from torch import Tensor

SPEC = DatasetSpec(
    name=loader.NAME,
    label_space=loader.LABEL_SPACE,
    build=loader.build,
    detect=loader.detect,
    splits=loader.SPLITS,
    description="images/ + masks/ (class-id PNGs) + splits/<split>.txt",
    default_split="train",
    patch_size=loader.PATCH_SIZE,
)


class $class_name(DomainPlugin):
    """Red squares and blue disks; replace with your domain's datasets and hooks."""

    name = "$name"
    description = "Scaffolded '$name' domain"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {SPEC.name: SPEC}

    def demo(self, root: Path) -> DemoData:
        """`wsss-domains train --domain $name` with no --data runs on this synthetic set."""
        return DemoData(
            SPEC.name, write_demo(Path(root) / "$name-demo"), train_split="train", eval_split="val", image_size=64
        )

    def metrics(self, confusion: Tensor, label_space: LabelSpace) -> list[MetricResult]:
        return [mean_class_accuracy(confusion, label_space)]

    def clip_prompts(self, label_space: LabelSpace) -> ClipPrompts:
        data = json.loads(resources.files("$package").joinpath("prompts.json").read_text())
        names = data.get("class_names", {})
        return ClipPrompts(
            class_names={c: tuple(names.get(c, [c])) for c in label_space.foreground_names},
            templates=tuple(data.get("templates", ["a photo of a {}."])),
            background=tuple(data.get("background", [])),
        )
'''

PROMPTS = """{
  "class_names": {
    "square": ["red square", "square"],
    "disk": ["blue disk", "circle"]
  },
  "templates": ["a photo of a {}.", "a picture of a {} on a grey background."],
  "background": ["grey noise", "background"]
}
"""

TEST = '''"""Tests of the '$name' plugin on a generated fixture."""

from __future__ import annotations

from pathlib import Path

import torch

from $package import $class_name
from $package.demo import write_demo
from $package.loader import LABEL_SPACE


def test_loader_yields_labelled_samples(tmp_path: Path) -> None:
    domain = $class_name()
    root = write_demo(tmp_path / "data", count=6, size=48)
    spec = domain.detect_dataset(root)
    dataset = spec.build(root, "train")
    assert len(dataset) == 4
    sample = dataset[0]
    assert sample["image"].shape == (3, 48, 48)
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert torch.equal(sample["label"], LABEL_SPACE.label_from_mask(sample["mask"]))
    assert sample["label"].sum() >= 1


def test_patches_from_masks(tmp_path: Path) -> None:
    root = write_demo(tmp_path / "data", count=3, size=48)
    patches = $class_name().dataset("folder").build(root, "all", labels_from_masks=True, patch_size=24)
    assert len(patches) == 3 * 4
    item = patches[0]
    assert item["image"].shape == (3, 24, 24)
    assert torch.equal(item["label"], LABEL_SPACE.label_from_mask(item["mask"]))


def test_metric_hook_against_hand_computed_values() -> None:
    confusion = torch.tensor([[6, 2, 0], [1, 1, 2], [0, 0, 0]])
    (result,) = $class_name().metrics(confusion, LABEL_SPACE)
    assert result.per_class == {"background": 0.75, "square": 0.25}  # no disk pixel: not scored
    assert result.value == 0.5


def test_prompts_cover_foreground_classes() -> None:
    prompts = $class_name().clip_prompts(LABEL_SPACE)
    assert set(prompts.class_names) == set(LABEL_SPACE.foreground_names)
'''

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "$package/__init__.py": INIT,
    "$package/loader.py": LOADER,
    "$package/metrics.py": METRICS,
    "$package/demo.py": DEMO,
    "$package/plugin.py": PLUGIN,
    "$package/prompts.json": PROMPTS,
    "tests/test_$package.py": TEST,
}
