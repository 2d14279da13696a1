"""The Lightning task that trains the segmenter on pseudo-labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassJaccardIndex


class SegmenterTask(L.LightningModule):
    """Pixel-wise cross-entropy on pseudo-labels; ignore-index pixels carry no loss.

    ``class_weights``: one weight per class for its pixels' loss (median frequency balancing,
    :mod:`wsss_domains.segmentation.class_weights`); the mean is then weighted, as torch's is.

    Logs the training loss and, per epoch, the mIoU of the predictions against the pseudo-labels
    (how well the network fits its own targets) and, when a validation loader with ground-truth masks
    is given, ``val/miou`` (for monitoring only: the last checkpoint is kept, never the best one).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        ignore_index: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        encoder_lr_mult: float = 0.1,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
        weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.ignore_index = ignore_index
        self.lr = lr
        self.weight_decay = weight_decay
        self.encoder_lr_mult = encoder_lr_mult
        self.train_iou = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro")
        self.val_iou = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro")
        self.training_progress = 0.0  # kept current by BudgetCosineSchedule

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["image"])
        target = batch["mask"]
        if not (target != self.ignore_index).any():
            loss = logits.sum() * 0.0  # a batch of unassigned pixels only: nothing to learn, keep DDP in step
        else:
            weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
            loss = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index)
        size = target.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.train_iou.update(logits.detach().argmax(1), target)
        self.log("train/miou_vs_pseudo_labels", self.train_iou, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(batch["image"])
        self.val_iou.update(logits.argmax(1), batch["mask"])
        self.log("val/miou", self.val_iou, on_step=False, on_epoch=True, batch_size=batch["mask"].shape[0])

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trained parameters outside the saved network (a training method's own heads), at the decoder's rate."""
        return []

    def configure_optimizers(self) -> Any:
        networks = getattr(self.model, "networks", (self.model,))  # a co-trained pair has two encoders
        encoder = [p for network in networks for p in network.encoder.parameters()]
        ids = {id(p) for p in encoder}
        others = [p for p in self.model.parameters() if id(p) not in ids] + self.extra_parameters()
        encoder_lr = self.lr * self.encoder_lr_mult
        return torch.optim.AdamW(
            [
                {"params": encoder, "lr": encoder_lr, "base_lr": encoder_lr},
                {"params": others, "lr": self.lr, "base_lr": self.lr},
            ],
            weight_decay=self.weight_decay,
        )
