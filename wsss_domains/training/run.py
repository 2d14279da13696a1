"""A training run on disk: ``run.json`` (what was trained, on what) plus ``model.pt`` (weights).

Everything needed to pseudo-label later lives in the run folder, so ``pseudo-labels --run RUN``
needs no other flag to rebuild the model and its preprocessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from wsss_domains.data.io import atomic_write
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.models.classifier import DEFAULT_BACKBONE, CamClassifier
from wsss_domains.models.vit import VitCamClassifier, is_vit_backbone
from wsss_domains.models.weights import load_state

RUN_FILE = "run.json"
MODEL_FILE = "model.pt"
METHOD_FILE = "method-modules.pt"


@dataclass
class RunConfig:
    domain: str
    dataset: str
    classes: list[str]
    foreground: list[str]
    # The domain plugin's options (``--domain-option``): every stage that reloads the run rebuilds
    # the plugin with them, so its preprocessing matches training. Absent from older run.json: none.
    domain_options: dict[str, object] = field(default_factory=dict)
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    output_stride: int = 16
    pooling: str = "gap"
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # training input (height, width)
    # Magnification the classifier saw in training (image_size / patch size); CAMs use it too.
    base_scale: float = 1.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    method: str = "cam"
    method_options: dict[str, object] = field(default_factory=dict)
    split: str | None = None
    data: str | None = None
    labels_from_masks: bool = False
    patch_size: list[int] | None = None
    random_patches: int | None = None  # windows drawn per image per epoch (None: a fixed grid)
    seed: int = 0
    # Repeat-factor sampling's threshold where rare classes were oversampled (None: uniform).
    balance_classes: float | None = None
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
        try:
            data = json.loads(path.read_text())
            data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
            return cls(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a valid run config ({type(exc).__name__}: {exc})") from exc


def run_label_space(config: RunConfig) -> tuple[DomainPlugin, LabelSpace]:
    """The domain (with the run's options) and label space a run was trained in, without its data set.

    Pseudo-labelling a raster has no data folder to recognise, so the classes come from the run's
    ``domain`` and ``dataset``; a dataset that declares its classes in its data folder still needs
    that folder (``config.data``). The run's foreground classes must match, or ids would be wrong.
    """
    from wsss_domains.domains.registry import recorded_label_space

    domain, label_space = recorded_label_space(
        config.domain, config.dataset, config.data, domain_options=config.domain_options
    )
    if list(label_space.foreground_names) != list(config.foreground):
        raise ValueError(
            f"the run was trained on classes {config.foreground}, but {config.dataset} has "
            f"{list(label_space.foreground_names)}"
        )
    return domain, label_space


def build_model(config: RunConfig, weights: str | None = None) -> CamClassifier:
    """The run's classifier: a CNN's last feature map, or a ViT's patch tokens laid out as one."""
    classifier = VitCamClassifier if is_vit_backbone(config.backbone) else CamClassifier
    return classifier(
        num_classes=len(config.foreground),
        backbone=config.backbone,
        weights=config.weights if weights is None else weights,
        output_stride=config.output_stride,
        pooling=config.pooling,
    )


def save_model(model: CamClassifier, modules: nn.ModuleDict, run_dir: Path) -> None:
    """The classifier's weights, and the method's extra trained modules when it has any."""
    state = model.state_dict()
    atomic_write(Path(run_dir) / MODEL_FILE, lambda tmp: torch.save(state, tmp))
    if len(modules):
        extra = modules.state_dict()
        atomic_write(Path(run_dir) / METHOD_FILE, lambda tmp: torch.save(extra, tmp))


def load_run(
    run_dir: Path, device: str | torch.device = "cpu"
) -> tuple[RunConfig, CamClassifier, nn.ModuleDict]:
    """The run's config, its trained classifier in eval mode, and the method's extra modules."""
    from wsss_domains.methods.registry import create_method

    config = RunConfig.load(run_dir)
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has no finished model (did training complete?)")
    model = build_model(config, weights="random")
    state = load_state(path, "model weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not the weights of this run's model ({str(exc).splitlines()[0]})") from exc
    method = create_method(config.method, **config.method_options)
    modules = method.build_modules(model)
    extra = Path(run_dir) / METHOD_FILE
    if len(modules) and extra.is_file():
        modules.load_state_dict(load_state(extra, "method modules"))
    return config, model.to(device).eval(), modules.to(device).eval()
