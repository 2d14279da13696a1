"""Stage 3: a segmentation network trained on the pseudo-labels of a training split."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from wsss_domains.data.windows import pair
from wsss_domains.domains.contract import LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.pipeline.data import open_dataset, resolve_device
from wsss_domains.pipeline.self_training import relabel_training_split
from wsss_domains.segmentation.class_weights import WEIGHTINGS, weights_for
from wsss_domains.segmentation.data import PseudoLabelledDataset
from wsss_domains.segmentation.fit import SegmenterTraining, train_segmenter
from wsss_domains.segmentation.model import (
    ARCHITECTURES,
    DEFAULT_ARCH,
    DEFAULT_TRAINING,
    TRAINING_METHODS,
    SegmenterConfig,
    check_architecture,
    check_training,
)
from wsss_domains.settings import setting
from wsss_domains.training.fit import TrainOptions
from wsss_domains.training.run import MODEL_FILE, RunConfig

DEFAULT_CROP = 320
FROM_CLASSIFIER = "classifier"  # --encoder-weights: the run's own trained backbone
MAX_SCALE_JITTER = 4.0  # beyond it a training crop would hold a few magnified pixels
STRIDE = 32  # segmentation_models_pytorch needs inputs divisible by the encoder's total stride


@dataclass
class SegmenterSettings(TrainOptions):
    """How the segmenter is built and trained (the ``segment`` command's options).

    The training budget, learning rate and devices are :class:`TrainOptions`' fields.
    """

    arch: str | None = setting(
        None,
        help="architecture (default: deeplabv3plus, or the domain's recipe)",
        choices=tuple(ARCHITECTURES),
    )
    encoder: str | None = setting(None, help="timm encoder (default: the classifier run's backbone)")
    weights: str = setting(
        "imagenet",
        help="'imagenet' (packaged weights, as the classifier's), 'classifier' (the run's trained backbone:"
        " what it learnt of the domain from the image labels; needs the run's encoder), 'random', or a"
        " state-dict path",
    )
    crop_size: int | None = setting(
        None, help=f"training crop side (default: the run's patch size, else {DEFAULT_CROP})"
    )
    scale: float = setting(
        1.0,
        help="magnification the segmenter trains and predicts at: 0.5 halves every image (a crop then covers"
        " four times the area, a step costs a quarter), 2 doubles it; predictions come back at the image's size",
    )
    scale_range: tuple[float, ...] = setting(
        (1.0, 1.0),
        help="random magnification of each training image, a factor drawn uniformly from LOW,HIGH (e.g. 0.5,2"
        " as DeepLab trains); prediction stays at one scale. Default: none",
        metavar="LOW,HIGH",
    )
    training: str = setting(
        DEFAULT_TRAINING,
        help="cross-entropy on the pseudo-labels; beco: two co-trained networks, confident pixels from the"
        " pseudo-labels' CAMs (written by pseudo-labels --save-cams); carb: after a third of the budget, the"
        " pixels where the segmenter agrees with the pseudo-label and those where it does not, balanced (with"
        " --carb-clip-model, also MaskCLIP labels of a random upscaled patch); das: Das et al.'s domain"
        " adaptation from an annotated --source-data (the pseudo-labels give each crop's classes only)",
        choices=tuple(TRAINING_METHODS),
    )
    class_weighting: str = setting(
        "none",
        help="median-frequency: each class's pixel loss weighted by median(f) / f_c, f_c its share of the"
        " pseudo-labelled pixels of the training images that hold it (SegNet's balancing on CamVid);"
        " cross-entropy training only",
        choices=WEIGHTINGS,
    )
    rounds: int = setting(
        1,
        help="training rounds: from the second on, the previous round's predictions of its training images"
        " (restricted to each image's labels) are the labels; each round trains for the whole budget",
    )
    carb_clip_model: str | None = setting(
        None,
        help="carb: the CLIP architecture whose MaskCLIP labels of a random upscaled patch add CARB's local view",
    )
    carb_clip_weights: str | None = setting(None, help="carb: that CLIP's local checkpoint file")
    source_data: Path | None = setting(
        None,
        help="das: an annotated source dataset's folder (its masks supervise; the domain's loaders read it)",
    )
    source_domain: str | None = setting(
        None,
        help="das: the domain plugin whose loaders read the source (default: the run's; 'custom' reads the"
        " generic folder format)",
    )
    source_dataset: str | None = setting(None, help="das: the source's loader name (default: recognised)")
    source_split: str | None = setting(None, help="das: the source's split (default: the loader's)")
    source_classes: str | None = setting(
        None,
        help="das: source class names mapped to the target's, e.g. 'building=urban,road=urban,background=ignore'"
        " (default: by name; source classes without a match carry no loss)",
    )
    batch_size: int = setting(8, help="crops per training batch")
    lr: float = setting(1e-3, help="decoder learning rate (encoder: 0.1x)")
    seed: int = setting(0, help="random seed")

    def check(self) -> None:
        super().check()
        check_architecture(self.arch or DEFAULT_ARCH)
        check_training(self.training)
        if self.rounds < 1:
            raise UserError(f"--seg-rounds must be at least 1, got {self.rounds}")
        if self.rounds > 1 and self.devices != 1:
            raise UserError(
                "--seg-rounds above 1 runs on one device (the relabelling between rounds is not sharded)"
            )
        if self.crop_size is not None and (self.crop_size < STRIDE or self.crop_size % STRIDE):
            raise UserError(f"--crop-size must be a positive multiple of {STRIDE}, got {self.crop_size}")
        if not self.scale > 0:
            raise UserError(f"--seg-scale must be positive, got {self.scale}")
        jitter = self.scale_range = tuple(float(s) for s in self.scale_range)
        if len(jitter) != 2 or not 0 < jitter[0] <= jitter[1] <= MAX_SCALE_JITTER:
            raise UserError(
                f"--scale-range takes LOW,HIGH with 0 < LOW <= HIGH <= {MAX_SCALE_JITTER:g}, got {jitter}"
            )
        if self.class_weighting != "none" and self.training != "cross-entropy":
            raise UserError(f"--class-weighting applies to --seg-training cross-entropy, not {self.training}")
        uses_source = self.training == "das"
        if uses_source and self.source_data is None:
            raise UserError("--seg-training das needs --source-data (an annotated source dataset)")
        names = ("source_data", "source_domain", "source_dataset", "source_split", "source_classes")
        given = [f for f in names if getattr(self, f)]
        if given and not uses_source:
            raise UserError(f"--{given[0].replace('_', '-')} is for --seg-training das")
        if self.source_classes:
            from wsss_domains.segmentation.source_domain import parse_class_map

            parse_class_map(self.source_classes)
        if self.carb_clip_model is not None:
            if self.training != "carb":
                raise UserError("--carb-clip-model is for --seg-training carb")
            from wsss_domains.clip.loading import resolve_clip_weights

            resolve_clip_weights(self.carb_clip_model, self.carb_clip_weights)  # before anything trains


def default_crop(run: RunConfig, training: PseudoLabelledDataset, scale: float) -> tuple[int, int]:
    """The run's patch size where it trained on patches, else the samples' size up to 320 pixels.

    Rounded up to a multiple of 32 (the encoders' total stride); padding carries no loss.
    """
    if run.patch_size:
        hw = [round(v * scale) for v in run.patch_size]
    else:
        h, w = training[0]["image"].shape[-2:]
        hw = [min(DEFAULT_CROP, round(max(h, w) * scale))] * 2
    return (-(-hw[0] // STRIDE) * STRIDE, -(-hw[1] // STRIDE) * STRIDE)


def encoder_weights(run: Path, config_run: RunConfig, encoder: str, weights: str) -> str:
    """``weights`` with ``classifier`` resolved to the run's weights file (its backbone part is loaded)."""
    if weights != FROM_CLASSIFIER:
        return weights
    if encoder != config_run.backbone:
        raise UserError(
            f"--encoder-weights classifier needs the run's backbone as encoder ({config_run.backbone}),"
            f" not {encoder}"
        )
    return str(Path(run).resolve() / MODEL_FILE)


def fit_segmenter(
    run: Path,
    pseudo_labels: Path,
    data: Path,
    out: Path,
    *,
    split: str | None = None,
    dataset: str | None = None,
    dataset_options: Mapping[str, object] | None = None,
    settings: SegmenterSettings | None = None,
    val_split: str | None = None,
    log: bool = True,
) -> SegmenterConfig:
    """Train a segmenter on the pseudo-labels ``pseudo_labels`` of ``split``; saved in ``out``.

    ``run`` is the classifier run the pseudo-labels came from: it gives the domain (with its
    recorded options, which the segmenter records in turn), the label space, the default encoder
    and crop size. ``dataset_options`` must be those the pseudo-labels were
    written with (``--tiles``), so sample ids match. ``val_split``: an annotated split of the same
    data scored every epoch for monitoring (``val/miou``); nothing is chosen by it. Re-running into
    ``out`` resumes.

    With ``settings.rounds`` above 1, the rounds before the last train in ``out/rounds/<r>/segmenter``
    and write their labels of the training split in ``out/rounds/<r>/labels``
    (:mod:`wsss_domains.pipeline.self_training`), which the next round trains on.
    """
    settings = settings or SegmenterSettings()
    settings.check()
    common: dict[str, Any] = dict(split=split, dataset=dataset, dataset_options=dataset_options, log=log)
    labels = Path(pseudo_labels)
    for done in range(1, settings.rounds):  # self-training: each round's predictions label the next
        round_dir = Path(out) / "rounds" / str(done)
        _fit_round(
            run, labels, data, round_dir / "segmenter", settings=settings, val_split=val_split, **common
        )
        following = round_dir / "labels"
        relabel_training_split(round_dir / "segmenter", labels, data, following, split=split, dataset=dataset,
                               dataset_options=dataset_options, device=resolve_device(settings.device),
                               save_scores=settings.training == "beco")  # fmt: skip
        labels = following
    return _fit_round(run, labels, data, out, settings=settings, val_split=val_split, **common)


def _fit_round(
    run: Path,
    pseudo_labels: Path,
    data: Path,
    out: Path,
    *,
    split: str | None,
    dataset: str | None,
    dataset_options: Mapping[str, object] | None,
    settings: SegmenterSettings,
    val_split: str | None,
    log: bool,
) -> SegmenterConfig:
    """One segmenter trained on ``pseudo_labels`` (see :func:`fit_segmenter`)."""
    config_run = RunConfig.load(run)
    opened = open_dataset(
        config_run.domain,
        dataset or config_run.dataset,
        data,
        split,
        domain_options=config_run.domain_options,
        **dict(dataset_options or {}),
    )
    label_space = opened.label_space
    if list(label_space.foreground_names) != config_run.foreground:
        raise UserError(
            f"the run was trained on classes {config_run.foreground}, but {opened.spec.name} has "
            f"{list(label_space.foreground_names)}"
        )
    training = PseudoLabelledDataset(
        opened.dataset, Path(pseudo_labels), label_space, confidence=settings.training == "beco"
    )
    crop = settings.crop_size or default_crop(config_run, training, settings.scale)
    encoder = settings.encoder or config_run.backbone
    mean, std = opened.domain.input_statistics()
    config = SegmenterConfig(
        domain=config_run.domain,
        dataset=opened.spec.name,
        classes=list(label_space.classes),
        domain_options=dict(config_run.domain_options),
        arch=settings.arch or DEFAULT_ARCH,
        encoder=encoder,
        weights=encoder_weights(run, config_run, encoder, settings.weights),
        mean=mean,
        std=std,
        crop_size=list(pair(crop)),
        scale=settings.scale,
        scale_range=list(settings.scale_range),
        training=settings.training,
        run=str(Path(run).resolve()),
        pseudo_labels=str(Path(pseudo_labels).resolve()),
        data=str(Path(data).resolve()),
        split=opened.split,
        seed=settings.seed,
        balance_classes=settings.balance_classes,
        class_weights=weights_for(
            settings.class_weighting, training, label_space.num_classes, label_space.ignore_index
        ),
    )
    options = replace(settings, device=resolve_device(settings.device))
    if log and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"training segmenter {config.arch} ({config.encoder}) on {len(training)} pseudo-labelled samples "
            f"of {opened.spec.name}/{opened.split}, {config.crop_size[0]}x{config.crop_size[1]} crops -> {out}"
        )
        if config.class_weights is not None:
            weights = ", ".join(
                f"{c} {w:.2f}" for c, w in zip(config.classes, config.class_weights, strict=True)
            )
            print(f"class weights ({settings.class_weighting}): {weights}")
    source = None
    if settings.training == "das":
        source, config.source = _open_source(config_run, label_space, settings)
    validation = None
    if val_split is not None:
        validation = open_dataset(
            config_run.domain, opened.spec.name, data, val_split, domain_options=config_run.domain_options
        ).dataset
    train_segmenter(
        config,
        opened.domain,
        label_space,
        training,
        Path(out),
        options,
        SegmenterTraining(
            lr=settings.lr, clip_model=settings.carb_clip_model, clip_weights=settings.carb_clip_weights
        ),
        validation=validation,
        source=source,
    )
    return config


def _open_source(
    run: RunConfig, label_space: LabelSpace, settings: SegmenterSettings
) -> tuple[Dataset, dict[str, object]]:
    """Das et al.'s source: the annotated dataset of ``settings``, its masks in the target's class ids."""
    from wsss_domains.segmentation.source_domain import SourceDomainDataset, class_lookup, parse_class_map

    assert settings.source_data is not None
    domain = settings.source_domain or run.domain
    opened = open_dataset(
        domain, settings.source_dataset, settings.source_data, settings.source_split,
        domain_options=run.domain_options if domain == run.domain else None,
    )  # fmt: skip
    mapping = parse_class_map(settings.source_classes)
    lookup = class_lookup(opened.label_space, label_space, mapping)
    record: dict[str, object] = {
        "data": str(Path(settings.source_data).resolve()),
        "domain": domain,
        "dataset": opened.spec.name,
        "split": opened.split,
        "classes": mapping,
    }
    return SourceDomainDataset(opened.dataset, lookup), record
