"""The Lightning task every training run uses: classifier + method losses + time-aware schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.methods.base import Method
from wsss_domains.models.classifier import CamClassifier


class ClassifierTask(L.LightningModule):
    """Multi-label classification from image-level labels, plus whatever the method adds."""

    def __init__(
        self,
        model: CamClassifier,
        method: Method,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        backbone_lr_mult: float = 0.1,
    ) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.method_modules = method.build_modules(model)
        self.lr = lr
        self.weight_decay = weight_decay
        self.backbone_lr_mult = backbone_lr_mult
        # Share of the training budget spent, kept current by BudgetCosineSchedule; methods read it
        # from ``batch["progress"]`` to switch phases (e.g. DuPL's warm-up) whatever bounds the run.
        self.training_progress = 0.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        device = batch["image"].device
        batch = {
            **batch,
            "step": torch.tensor(self.global_step, device=device),
            "progress": torch.tensor(self.training_progress, device=device),
        }
        outputs = self.method.forward(self.model, self.method_modules, batch)
        cls_loss = F.binary_cross_entropy_with_logits(outputs["logits"], batch["label"])
        self.log("train/cls_loss", cls_loss, prog_bar=False, batch_size=batch["label"].shape[0])
        loss = self.method.classification_weight * cls_loss  # x1.0 is exact: plain CAM unchanged
        for name, extra in self.method.training_losses(
            self.model, self.method_modules, batch, outputs
        ).items():
            self.log(f"train/{name}", extra, batch_size=batch["label"].shape[0])
            loss = loss + extra
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        backbone = list(self.model.backbone.parameters())
        others = list(self.model.head.parameters())
        scales = self.method.learning_rate_scales()
        scaled = []
        for name, module in self.method_modules.items():
            if name in scales:
                lr = self.lr * scales[name]
                scaled.append({"params": list(module.parameters()), "lr": lr, "base_lr": lr})
            else:
                (backbone if name in self.method.backbone_modules else others).extend(module.parameters())
        return torch.optim.AdamW(
            [
                {
                    "params": backbone,
                    "lr": self.lr * self.backbone_lr_mult,
                    "base_lr": self.lr * self.backbone_lr_mult,
                },
                {"params": others, "lr": self.lr, "base_lr": self.lr},
                *scaled,
            ],
            weight_decay=self.weight_decay,
        )


class BudgetCosineSchedule(L.Callback):
    """Cosine learning-rate decay over whichever budget ends first: time, epochs or optimiser steps.

    Training here is usually bounded by ``--max-minutes``, so the schedule follows the elapsed
    share of the time budget (resumed runs continue where the saved timer stopped).
    """

    def __init__(self, max_seconds: float | None, warmup_steps: int = 20, min_factor: float = 0.02) -> None:
        self.max_seconds = max_seconds
        self.warmup_steps = warmup_steps
        self.min_factor = min_factor

    def _progress(self, trainer: L.Trainer) -> float:
        shares = [0.0]
        if self.max_seconds:
            from lightning.pytorch.callbacks import Timer

            timers = [c for c in trainer.callbacks if isinstance(c, Timer)]  # type: ignore[attr-defined]
            if timers:
                shares.append((timers[0].time_elapsed("train") or 0.0) / self.max_seconds)
        if (
            trainer.max_epochs
            and trainer.max_epochs > 0
            and trainer.num_training_batches not in (0, math.inf)
        ):
            total = trainer.max_epochs * trainer.num_training_batches
            shares.append(trainer.global_step / max(1, total))
        if trainer.max_steps and trainer.max_steps > 0:
            shares.append(trainer.global_step / trainer.max_steps)
        return min(1.0, max(shares))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        progress = self._progress(trainer)
        if hasattr(pl_module, "training_progress"):
            pl_module.training_progress = progress
        factor = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if trainer.global_step < self.warmup_steps:
            factor *= (trainer.global_step + 1) / self.warmup_steps
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = group["base_lr"] * factor
