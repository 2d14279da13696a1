"""CARB: consistency-aware region balancing of the segmenter's loss (Kim et al., AAAI 2024).

Why: CLIP-style pseudo-labels of street scenes are noisy, and a segmenter trained on every pixel
alike learns their noise. After a warm-up, CARB splits each pseudo-label into the pixels where the
segmenter's own prediction agrees with it (reliable) and those where it disagrees (likely noise),
and weights the disagreeing part so that its loss does not outweigh the agreeing one. As the
official ``mmseg/models/decode_heads/carb_head.py`` (``CARBHead.losses``, CamVid configuration
``configs/carb/camvid_carb_dual.py``):

- before the warm-up ends: cross-entropy on every assigned pseudo-label pixel;
- after: the segmenter's label is ``argmax(logits * present)``, the logits multiplied by the image's
  0/1 class labels (an absent class's logit becomes 0, not -inf: the official quirk, kept);
  ``L = CE(pixels where it equals the pseudo-label) + c * CE(pixels where it differs)``, each a mean
  over its own pixels;
- adaptive ``c`` (``adaptive=True``, ``coeff=1``): ``coeff * mean(Q_agree) / mean(Q_differ)`` over
  queues of the last 5 steps' two losses (initially zeros, the current step's losses written at slot
  ``step % 5`` before ``c`` is computed), detached.

The warm-up is a fraction of the training budget (default 1/3: CamVid's 4,000 of 12,000 iterations).
Deviations: the image-level labels are the classes present in each crop's pseudo-label (official:
the whole image's labels); the "global-local view" of the same paper (a second CLIP pseudo-label of a
random upscaled patch, which needs CLIP at training time) is not part of this loss; a step whose
pixels all agree (or all differ) skips the empty term (the official mean over no pixel is NaN), and
``c`` keeps its last value while the queue of disagreeing losses sums to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.segmentation.task import SegmenterTask


@dataclass(frozen=True)
class CarbOptions:
    """CARB's schedule and weight (official CamVid configuration)."""

    warm_up: float = 1 / 3  # fraction of the budget before the split (official: 4,000 of 12,000 iterations)
    coeff: float = 1.0
    adaptive: bool = True
    queue_size: int = 5


def present_classes(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``B x C`` 0/1: the classes each ``B x H x W`` pseudo-label assigns somewhere."""
    out = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    for i, label in enumerate(labels):
        ids = label[label != ignore_index].unique()
        out[i, ids] = 1.0
    return out


def split_by_agreement(
    logits: Tensor, labels: Tensor, present: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """The pseudo-label's pixels where the segmenter's ``argmax(logits * present)`` agrees, and where it
    differs (the other pixels set to ``ignore_index`` in each)."""
    own = (logits.detach() * present[:, :, None, None]).argmax(1)
    agree = labels.masked_fill(labels != own, ignore_index)
    differ = labels.masked_fill(labels == own, ignore_index)
    return agree, differ


def _mean_ce(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor | None:
    if not (labels != ignore_index).any():
        return None
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


class CarbTask(SegmenterTask):
    """Cross-entropy until the warm-up ends, then the agreeing and disagreeing pixels balanced."""

    def __init__(
        self, model: torch.nn.Module, num_classes: int, ignore_index: int, options: CarbOptions | None = None,
        **kwargs: object,
    ) -> None:  # fmt: skip
        super().__init__(model, num_classes, ignore_index, **kwargs)  # type: ignore[arg-type]
        self.options = options or CarbOptions()
        self.num_classes = num_classes
        # Buffers, so that a resumed run continues the queues and the step count from its checkpoint.
        self.register_buffer("agree_losses", torch.zeros(self.options.queue_size))
        self.register_buffer("differ_losses", torch.zeros(self.options.queue_size))
        self.register_buffer("coeff_state", torch.tensor(float(self.options.coeff)))
        self.register_buffer("step_count", torch.tensor(0))

    @property
    def coeff_loss(self) -> float:
        return float(self.coeff_state)

    def carb_loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The balanced loss of one batch after the warm-up, and what to log."""
        present = present_classes(labels, self.num_classes, self.ignore_index)
        agree, differ = split_by_agreement(logits, labels, present, self.ignore_index)
        loss_agree = _mean_ce(logits, agree, self.ignore_index)
        loss_differ = _mean_ce(logits, differ, self.ignore_index)
        if self.options.adaptive:
            slot = int(self.step_count) % self.options.queue_size
            self.agree_losses[slot] = 0.0 if loss_agree is None else float(loss_agree.detach())
            self.differ_losses[slot] = 0.0 if loss_differ is None else float(loss_differ.detach())
            if float(self.differ_losses.sum()) > 0:
                self.coeff_state.fill_(
                    self.options.coeff * float(self.agree_losses.mean() / self.differ_losses.mean())
                )
        loss = logits.sum() * 0.0
        if loss_agree is not None:
            loss = loss + loss_agree
        if loss_differ is not None:
            loss = loss + self.coeff_loss * loss_differ
        logged = {
            "coeff": self.coeff_loss,
            "agreeing_fraction": float((agree != self.ignore_index).float().mean()),
        }
        return loss, logged

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["image"])
        target = batch["mask"]
        self.step_count += 1
        size = target.shape[0]
        if self.training_progress < self.options.warm_up:
            plain = _mean_ce(logits, target, self.ignore_index)
            loss = logits.sum() * 0.0 if plain is None else plain
        else:
            loss, logged = self.carb_loss(logits, target)
            for name, value in logged.items():
                self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.train_iou.update(logits.detach().argmax(1), target)
        self.log("train/miou_vs_pseudo_labels", self.train_iou, on_step=False, on_epoch=True, batch_size=size)
        return loss
