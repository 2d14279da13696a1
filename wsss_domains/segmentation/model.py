"""The segmenter: an encoder-decoder of segmentation-models-pytorch over a timm encoder.

The encoder is the classifier's backbone family (timm, through smp's ``tu-`` prefix), started from
the same packaged ImageNet weights (:mod:`wsss_domains.models.weights`), so nothing is downloaded.
A trained segmenter is a folder: ``segmenter.json`` (what it predicts, how its input is prepared)
and ``model.pt`` (weights); ``predict --model SEG`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from wsss_domains.data.io import atomic_write
from wsss_domains.domains.contract import IMAGENET_MEAN, IMAGENET_STD, DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.models.classifier import DEFAULT_BACKBONE
from wsss_domains.models.weights import load_state

CONFIG_FILE = "segmenter.json"
WEIGHTS_FILE = "model.pt"
# CLI name -> segmentation_models_pytorch architecture.
ARCHITECTURES = {
    "deeplabv3plus": "DeepLabV3Plus",
    "unet": "Unet",
    "fpn": "FPN",
    "segformer": "Segformer",
}
DEFAULT_ARCH = "deeplabv3plus"
# How the segmenter learns from pseudo-labels: plain cross-entropy, or BECO's co-trained pair
# (:mod:`wsss_domains.segmentation.beco`), which needs the pseudo-labels' CAMs (``--save-cams``).
TRAINING_METHODS = {
    "cross-entropy": "one network, cross-entropy on every assigned pseudo-label pixel",
    "beco": "BECO (Rong et al., CVPR 2023): two co-trained networks, cross-entropy on each class's confident"
    " half of pixels (CAM top-two margin), cross-supervision elsewhere, ClassMix with online labels and"
    " up-weighted pasted boundaries; needs the pseudo-labels' CAMs",
    "carb": "CARB (Kim et al., AAAI 2024): cross-entropy, then after a third of the budget the pixels where the"
    " segmenter agrees with the pseudo-label and those where it disagrees as two losses, the second weighted"
    " adaptively by their ratio; with a CLIP, also MaskCLIP labels of a random upscaled patch (its local view)",
    "das": "Das et al. (CVPR 2023): domain adaptation from an annotated source dataset (--source-data): source"
    " cross-entropy, a mean teacher's confident labels of the target under ClassMix, image-level loss on the"
    " target crops' classes, per-domain class prototypes and prototypical contrast across domains",
}
DEFAULT_TRAINING = "cross-entropy"


@dataclass
class SegmenterConfig:
    """What a segmenter predicts and how its input is prepared; saved as ``segmenter.json``."""

    domain: str
    dataset: str
    classes: list[str]  # every class of the label space: the network's output channels
    # The domain plugin's options, copied from the classifier run: predict rebuilds the plugin with
    # them so images are prepared as in training. Absent from older segmenter.json: none.
    domain_options: dict[str, object] = field(default_factory=dict)
    arch: str = DEFAULT_ARCH
    encoder: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Training crops (height, width) and the magnification images are resized by before the network.
    crop_size: list[int] = field(default_factory=lambda: [320, 320])
    scale: float = 1.0
    # Random magnification of each training sample, on top of ``scale``: a factor drawn uniformly from
    # [low, high] (DeepLab-style multi-scale training). Prediction stays at ``scale``.
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    training: str = DEFAULT_TRAINING  # one of TRAINING_METHODS; "beco" saves two networks
    # Where it came from: the classifier run, the pseudo-labels and the split they label.
    run: str | None = None
    pseudo_labels: str | None = None
    data: str | None = None
    split: str | None = None
    seed: int = 0
    # Repeat-factor sampling's threshold where rare classes were oversampled (None: uniform).
    balance_classes: float | None = None
    # Per-class weights of the pixel loss (median frequency balancing of the pseudo-labels; None: unweighted).
    class_weights: list[float] | None = None
    # Das et al.'s annotated source dataset: data, dataset, split and the class map (None: not used).
    source: dict[str, object] | None = None

    def save(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=2)
        atomic_write(Path(folder) / CONFIG_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, folder: Path) -> SegmenterConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"{path} not found: is {folder} a segmenter folder (wsss-domains segment --out)?")
        try:
            data = json.loads(path.read_text())
            data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
            return cls(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise UserError(f"{path}: not a valid segmenter config ({exc})") from exc

    def label_space(self) -> tuple[DomainPlugin, LabelSpace]:
        """The domain and label space the segmenter predicts (classes checked against the domain's)."""
        from wsss_domains.domains.registry import recorded_label_space

        domain, label_space = recorded_label_space(
            self.domain, self.dataset, self.data, "the segmenter", self.domain_options
        )
        if list(label_space.classes) != list(self.classes):
            raise UserError(
                f"the segmenter predicts classes {self.classes}, but {self.dataset} has {list(label_space.classes)}"
            )
        return domain, label_space


def check_architecture(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown segmenter architecture '{arch}' ({', '.join(ARCHITECTURES)})")
    return arch


def check_training(training: str) -> str:
    if training not in TRAINING_METHODS:
        raise UserError(f"unknown segmenter training '{training}' ({', '.join(TRAINING_METHODS)})")
    return training


def build_segmenter(config: SegmenterConfig, weights: str | None = None) -> nn.Module:
    """The network of ``config``; its encoder starts from ``weights`` (default: the config's).

    BECO's is a pair of independently initialised networks whose logits are averaged."""
    if check_training(config.training) == "beco":
        from wsss_domains.segmentation.beco import CoTrainedPair

        return CoTrainedPair(build_network(config, weights), build_network(config, weights))
    return build_network(config, weights)


def build_network(config: SegmenterConfig, weights: str | None = None) -> nn.Module:
    """One smp encoder-decoder of ``config``'s architecture and encoder."""
    import segmentation_models_pytorch as smp

    check_architecture(config.arch)
    model = smp.create_model(
        ARCHITECTURES[config.arch],
        encoder_name=f"tu-{config.encoder}",
        encoder_weights=None,
        classes=len(config.classes),
    )
    load_encoder_weights(model.encoder.model, config.encoder, config.weights if weights is None else weights)
    return model


def load_encoder_weights(encoder: nn.Module, name: str, weights: str) -> str:
    """Load the backbone weights the classifier would start from into smp's timm feature encoder.

    timm's feature extractor holds the same modules as the headless backbone, minus its last 1x1
    convolution; every tensor the encoder has must come from ``weights``.
    """
    from wsss_domains.models.classifier import CamClassifier
    from wsss_domains.models.weights import load_backbone_weights

    if weights in ("random", None):
        return "random initialisation (explicitly requested)"
    backbone = CamClassifier.create_backbone(name, 32)
    source = load_backbone_weights(backbone, name, weights)
    state = backbone.state_dict()
    target = encoder.state_dict()
    missing = [key for key in target if key not in state or state[key].shape != target[key].shape]
    if missing:
        raise ValueError(
            f"{name}: {len(missing)} encoder tensors have no pretrained counterpart ({missing[0]})"
        )
    encoder.load_state_dict({key: state[key] for key in target})
    return source


def save_segmenter(model: nn.Module, config: SegmenterConfig, folder: Path) -> None:
    """Weights first, then the config: a config never vouches for weights not yet written."""
    state = model.state_dict()
    atomic_write(Path(folder) / WEIGHTS_FILE, lambda tmp: torch.save(state, tmp))
    config.save(folder)


def load_segmenter(folder: Path, device: str | torch.device = "cpu") -> tuple[SegmenterConfig, nn.Module]:
    """The saved config and the trained network in eval mode; one clear error for a broken folder."""
    config = SegmenterConfig.load(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: the segmenter has no finished model (did `segment` complete?)")
    model = build_segmenter(config, weights="random")
    state = load_state(path, "segmenter weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: not this segmenter's weights ({str(exc).splitlines()[0][:200]})") from exc
    return config, model.to(device).eval()
