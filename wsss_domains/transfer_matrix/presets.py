"""Per-domain recipes for one column of the domain-transfer matrix: which data, which hold-out.

Each preset trains on one slice of a domain's development data and scores another slice of the same
data (a hold-out: the two never share an image, see :mod:`wsss_domains.data.splits`), so every
column of the matrix is scored on images its classifier never saw. Paths are relative to a data
root (``../shared/data`` beside the checkout by default). The presets are data, not code:
``presets.yaml`` beside this module holds the built-in ones, ``bench --presets FILE.yaml`` a user's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wsss_domains.cam.settings import DEFAULT_SCALES
from wsss_domains.errors import UserError
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
    # The classifier's training seed (bench --seeds repeats a column over several).
    seed: int = 0
    # Options of the domain plugin (as `--domain-option`), e.g. {"stain": "macenko"} for histo.
    domain_options: Mapping[str, object] = field(default_factory=dict)
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
        data["domain_options"] = dict(self.domain_options)
        return data


PRESETS_FILE = Path(__file__).with_name("presets.yaml")


def load_presets(path: Path | str = PRESETS_FILE) -> dict[str, CellPreset]:
    """The presets of a YAML file (name -> :class:`CellPreset` fields); unknown or missing fields fail."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read the presets file ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: a presets file maps preset names to their fields")
    names = {f.name for f in fields(CellPreset)}
    required = {f.name for f in fields(CellPreset) if f.default is MISSING and f.default_factory is MISSING}
    presets = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: preset '{name}' must be a mapping of fields")
        unknown, missing = sorted(set(entry) - names), sorted(required - set(entry))
        if unknown or missing:
            problem = f"unknown field(s) {', '.join(unknown)}" if unknown else ""
            problem += ("; " if unknown and missing else "") + (
                f"missing {', '.join(missing)}" if missing else ""
            )
            raise UserError(f"{path}: preset '{name}': {problem} (fields: {', '.join(sorted(names))})")
        if "scales" in entry:
            entry = {**entry, "scales": tuple(float(s) for s in entry["scales"])}
        presets[str(name)] = CellPreset(**entry)
    return presets


DEFAULT_PRESETS: Mapping[str, CellPreset] = load_presets()
