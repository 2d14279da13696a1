"""Stage 1: a CAM classifier trained from image-level labels, saved as a run folder."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from wsss_domains.data.windows import pair
from wsss_domains.domains import check_domain_options
from wsss_domains.errors import UserError
from wsss_domains.models.classifier import DEFAULT_BACKBONE
from wsss_domains.pipeline.data import open_dataset, resolve_device, validate_dataset
from wsss_domains.settings import setting
from wsss_domains.training.fit import TrainOptions, train
from wsss_domains.training.run import RunConfig

DEFAULT_IMAGE_SIZE = 224


@dataclass
class ClassifierSettings(TrainOptions):
    """How the classifier is built and trained (the ``train`` command's options).

    The training budget, batch, learning rate and devices are :class:`TrainOptions`' fields.
    """

    method: str = "cam"
    method_options: dict[str, object] = field(default_factory=dict)
    backbone: str = setting(DEFAULT_BACKBONE, help="timm backbone name")
    weights: str = setting(
        "imagenet",
        help="'imagenet' (packaged or locally cached pretrained weights), 'random', or a state-dict path",
    )
    image_size: int | None = setting(None, help="training input size in pixels (default 224)")
    output_stride: int = setting(16, help="backbone output stride", choices=(8, 16, 32))
    pooling: str = setting("gap", help="CAM-to-logit pooling", choices=("gap", "gmp", "lse"))
    labels_from_masks: bool = setting(
        False, help="cut fully annotated images into patches and label each patch by the classes in its mask"
    )
    patch_size: int | None = setting(None, help="patch size for --labels-from-masks (default: the loader's)")
    random_patches: int | None = setting(
        None,
        metavar="K",
        help="with --labels-from-masks: draw K windows per image at random positions every epoch "
        "(each labelled from its own mask) instead of cutting a fixed grid",
    )
    seed: int = setting(0, help="random seed")


@dataclass
class TrainedClassifier:
    run: Path
    config: RunConfig
    # False in the other processes of a multi-process (DDP) run: only process 0 goes on.
    is_global_zero: bool = True


def train_classifier(
    domain: str,
    data: Path,
    out: Path,
    *,
    split: str | None = None,
    dataset: str | None = None,
    settings: ClassifierSettings | None = None,
    domain_options: Mapping[str, object] | None = None,
    demo: bool = False,
    log: bool = True,
) -> TrainedClassifier:
    """Train on ``split`` of the dataset at ``data``; everything goes to the run folder ``out``.

    ``domain_options`` build the domain plugin (e.g. ``{"stain": "macenko"}`` for histo); they are
    checked first and recorded in ``run.json``, so later stages rebuild the same plugin. Re-running
    with the same ``out`` resumes from its last checkpoint.
    """
    settings = settings or ClassifierSettings()
    settings.check()
    domain_options = check_domain_options(domain, domain_options)
    if settings.image_size is not None and settings.image_size < 16:
        raise UserError(f"--image-size must be at least 16 pixels, got {settings.image_size}")
    device = resolve_device(settings.device)
    opened = open_dataset(
        domain,
        dataset,
        data,
        split,
        domain_options=domain_options,
        labels_from_masks=settings.labels_from_masks,
        patch_size=settings.patch_size,
        random_patches=settings.random_patches if settings.labels_from_masks else None,
    )
    label_space = opened.label_space
    if os.environ.get("LOCAL_RANK", "0") == "0":
        validate_dataset(opened.dataset, label_space)
    mean, std = opened.domain.input_statistics()
    image_size = settings.image_size or DEFAULT_IMAGE_SIZE
    patch = pair(settings.patch_size or opened.spec.patch_size) if settings.labels_from_masks else None
    # Patches keep their aspect ratio and are magnified to image_size on their long side; CAMs later
    # run at that same magnification (base_scale). Whole images are resized to a square.
    scale = image_size / max(patch) if patch else 1.0
    input_size = (round(patch[0] * scale), round(patch[1] * scale)) if patch else (image_size, image_size)
    config = RunConfig(
        domain=domain,
        dataset=opened.spec.name,
        classes=list(label_space.classes),
        foreground=list(label_space.foreground_names),
        domain_options=domain_options,
        backbone=settings.backbone,
        weights=settings.weights,
        output_stride=settings.output_stride,
        pooling=settings.pooling,
        image_size=list(input_size),
        base_scale=scale,
        mean=mean,
        std=std,
        method=settings.method,
        method_options=dict(settings.method_options),
        split=opened.split,
        data=str(Path(data).resolve()),
        labels_from_masks=settings.labels_from_masks,
        patch_size=list(patch) if patch else None,
        random_patches=settings.random_patches if settings.labels_from_masks else None,
        seed=settings.seed,
        balance_classes=settings.balance_classes,
        demo=demo,
    )
    options = replace(settings, device=device)
    if log:
        note = " (domain options: " + ", ".join(f"{k}={v}" for k, v in domain_options.items()) + ")"
        print(
            f"training {settings.backbone} ({settings.method}) on {opened.spec.name}/{opened.split}: "
            f"{len(opened.dataset)} samples{note if domain_options else ''} -> {out}"  # type: ignore[arg-type]
        )
    trainer = train(config, opened.domain, opened.dataset, Path(out), options)
    return TrainedClassifier(Path(out), config, trainer.is_global_zero)
