"""A training run on disk: ``run.json`` (what was trained, on what) plus ``model.pt`` (weights).

Everything needed to pseudo-label later lives in the run folder, so ``pseudo-labels --run RUN``
needs no other flag to rebuild the model and its preprocessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wsss_domains.data.io import atomic_write
from wsss_domains.models.classifier import DEFAULT_BACKBONE, CamClassifier

RUN_FILE = "run.json"
MODEL_FILE = "model.pt"


@dataclass
class RunConfig:
    domain: str
    dataset: str
    classes: list[str]
    foreground: list[str]
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    output_stride: int = 16
    pooling: str = "gap"
    image_size: int = 224
    # Magnification the classifier saw in training (image_size / patch size); CAMs use it too.
    base_scale: float = 1.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    method: str = "cam"
    method_options: dict[str, object] = field(default_factory=dict)
    split: str | None = None
    data: str | None = None
    labels_from_masks: bool = False
    patch_size: int | None = None
    seed: int = 0
    demo: bool = False

    def save(self, run_dir: Path) -> None:
        text = json.dumps(asdict(self), indent=2)
        atomic_write(run_dir / RUN_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: is {run_dir} a training run folder (wsss-domains train --out)?"
            )
        data = json.loads(path.read_text())
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


def build_model(config: RunConfig, weights: str | None = None) -> CamClassifier:
    return CamClassifier(
        num_classes=len(config.foreground),
        backbone=config.backbone,
        weights=config.weights if weights is None else weights,
        output_stride=config.output_stride,
        pooling=config.pooling,
    )


def save_model(model: CamClassifier, run_dir: Path) -> None:
    state = model.state_dict()
    atomic_write(Path(run_dir) / MODEL_FILE, lambda tmp: torch.save(state, tmp))


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> tuple[RunConfig, CamClassifier]:
    """The run's config and its trained classifier in eval mode."""
    config = RunConfig.load(run_dir)
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has no finished model (did training complete?)")
    model = build_model(config, weights="random")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return config, model.to(device).eval()
