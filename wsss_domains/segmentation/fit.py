"""Training the segmenter on a split's pseudo-labels, with the classifier's Lightning machinery.

Same budget, schedule, checkpoints, resume, CSV log, seed and DDP as ``train``
(:func:`wsss_domains.training.fit.fit_task`); only the task (pixel-wise cross-entropy on
pseudo-labels) and the data (random crops of the pseudo-labelled images) differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from wsss_domains.data.balance import repeat_factors, sample_class_sets
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.segmentation.data import SegmentationView, ValidationView
from wsss_domains.segmentation.model import SegmenterConfig, build_segmenter, save_segmenter
from wsss_domains.segmentation.task import SegmenterTask
from wsss_domains.training.fit import TrainOptions, fit_task


@dataclass
class SegmenterTraining:
    """Optimisation settings of the segmenter."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_mult: float = 0.1
    # CARB's local view: the CLIP whose MaskCLIP labels supervise a random upscaled patch (None: without it).
    clip_model: str | None = None
    clip_weights: str | None = None


def train_segmenter(
    config: SegmenterConfig,
    domain: DomainPlugin,
    label_space: LabelSpace,
    dataset: Dataset,
    out: Path,
    options: TrainOptions,
    training: SegmenterTraining | None = None,
    validation: Dataset | None = None,
    source: Dataset | None = None,
) -> L.Trainer:
    """Train on ``dataset`` (samples whose ``mask`` is a pseudo-label); writes ``out``.

    ``validation``: annotated samples scored each epoch (``val/miou`` in the log) for monitoring;
    the last weights are kept whatever it says. Re-running with the same ``out`` resumes from its
    last checkpoint. Only the global-zero process writes the final ``model.pt`` and ``segmenter.json``.
    ``source``: annotated samples of another dataset in the same class ids (Das et al.'s training).
    """
    out = Path(out)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise UserError("the segmenter's training set is empty")
    if config.arch == "deeplabv3plus" and min(n, options.batch_size) < 2:
        raise UserError("deeplabv3plus trains on batches of at least 2 crops (its pooling branch needs them)")
    training = training or SegmenterTraining()
    if config.class_weights is not None and config.training != "cross-entropy":
        raise UserError(f"class weights apply to cross-entropy training, not {config.training}")
    L.seed_everything(config.seed, workers=True, verbose=False)
    model = build_segmenter(config)
    optimisation = {
        "lr": training.lr,
        "weight_decay": training.weight_decay,
        "encoder_lr_mult": training.encoder_lr_mult,
    }
    if config.training == "beco":
        from wsss_domains.segmentation.beco import BecoTask

        task: SegmenterTask = BecoTask(
            model, label_space.num_classes, label_space.ignore_index, **optimisation
        )
    elif config.training == "carb":
        from wsss_domains.segmentation.carb import CarbTask, local_view

        view_of_clip = None
        if training.clip_model is not None:
            view_of_clip = local_view(training.clip_model, training.clip_weights, domain, label_space, config)
        task = CarbTask(
            model, label_space.num_classes, label_space.ignore_index, local_view=view_of_clip, **optimisation
        )
    elif config.training == "das":
        from wsss_domains.segmentation.das import DasTask

        task = DasTask(model, label_space.num_classes, label_space.ignore_index, **optimisation)
    else:
        weights = config.class_weights
        task = SegmenterTask(
            model, label_space.num_classes, label_space.ignore_index, class_weights=weights, **optimisation
        )
    crop = (config.crop_size[0], config.crop_size[1])
    low, high = config.scale_range
    view: Dataset = SegmentationView(
        dataset, domain, label_space, crop, config.mean, config.std, config.scale, scale_range=(low, high)
    )
    if config.training == "das":
        from wsss_domains.segmentation.source_domain import PairedView

        if source is None:
            raise UserError("das training needs a source dataset (--source-data)")
        source_view = SegmentationView(
            source, domain, label_space, crop, config.mean, config.std, config.scale, scale_range=(low, high)
        )
        view = PairedView(view, source_view)
    val_loader = None
    if validation is not None:
        val_view = ValidationView(validation, domain, label_space, config.mean, config.std, config.scale)
        val_loader = DataLoader(val_view, batch_size=1, num_workers=options.num_workers)
    factors = None
    if options.balance_classes:  # None or 0: uniform
        factors = repeat_factors(sample_class_sets(dataset, label_space), options.balance_classes)
    trainer = fit_task(task, view, out, options, val_loader, factors)
    if trainer.is_global_zero:
        save_segmenter(task.model.cpu(), config, out)
    return trainer
