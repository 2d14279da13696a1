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
**Global-local view** (with a CLIP model, :class:`LocalView`): each step also takes a random patch of
the crops (``patch`` of its height and width), resizes it by a factor drawn in ``[offset, offset +
rate]`` (CamVid: 0.5 to 2.5), labels it with MaskCLIP (:mod:`wsss_domains.clip.maskclip`: cosine
with each class's text times the image labels, resized to the patch, arg-max over all classes) and
adds the same loss on the segmenter's logits of that patch (before the warm-up ends: cross-entropy;
after: its agreeing pixels plus ``c`` times its disagreeing ones).

Deviations: the image-level labels are the classes present in each crop's pseudo-label (official:
the whole image's labels); the patch is a fraction of the crop (official: 512 x 256 pixels of
720 x 960 CamVid crops) and its resized side is rounded up to CLIP's patch size; a label space's
background class is matched to the mean of the domain's background words; a step whose pixels all
agree (or all differ) skips the empty term (the official mean over no pixel is NaN), and ``c`` keeps
its last value while the queue of disagreeing losses sums to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.segmentation.task import SegmenterTask


class LocalView:
    """MaskCLIP labels of a random, resized patch of the training crops (CARB's global-local view)."""

    def __init__(
        self, model: torch.nn.Module, text: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
        patch: tuple[float, float] = (0.5, 0.5), rate: float = 2.0, offset: float = 0.5, seed: int = 0,
    ) -> None:  # fmt: skip
        self.model = model
        self.text = torch.nn.functional.normalize(text.float(), dim=-1)  # C x E, one row per class
        self.mean = torch.tensor(mean)[:, None, None]
        self.std = torch.tensor(std)[:, None, None]
        self.patch, self.rate, self.offset = patch, rate, offset
        self.generator = torch.Generator().manual_seed(seed)

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, patch height, patch width)`` drawn at random inside ``height x width``."""
        ph, pw = max(1, round(self.patch[0] * height)), max(1, round(self.patch[1] * width))
        top = int(torch.randint(0, height - ph + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, width - pw + 1, (1,), generator=self.generator))
        return top, left, ph, pw

    @torch.no_grad()
    def labels(self, images: Tensor, present: Tensor) -> Tensor:
        """``B x h x w`` MaskCLIP labels of normalised ``B x 3 x h x w`` patches, seen ``factor`` x larger."""
        import math

        from wsss_domains.clip.maskclip import dense_features
        from wsss_domains.clip.vit import patch_size, prepare_pixels

        visual = self.model.visual
        factor = self.rate * float(torch.rand((), generator=self.generator)) + self.offset
        h, w = images.shape[-2:]
        ph, pw = patch_size(visual)
        size = (max(ph, math.ceil(h * factor / ph) * ph), max(pw, math.ceil(w * factor / pw) * pw))
        raw = (images.detach().cpu().float() * self.std + self.mean).clamp(0, 1)
        pixels = torch.cat([prepare_pixels(self.model, image, size) for image in raw])
        features, _ = dense_features(visual, pixels)
        scores = torch.einsum("bchw,kc->bkhw", features, self.text.to(features.device))
        scores = scores * present.to(scores.device)[:, :, None, None]
        scores = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
        return scores.argmax(1).to(images.device)


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
        local_view: LocalView | None = None, **kwargs: object,
    ) -> None:  # fmt: skip
        super().__init__(model, num_classes, ignore_index, **kwargs)  # type: ignore[arg-type]
        self.options = options or CarbOptions()
        self.local_view = local_view
        self.num_classes = num_classes
        # Buffers, so that a resumed run continues the queues and the step count from its checkpoint.
        self.register_buffer("agree_losses", torch.zeros(self.options.queue_size))
        self.register_buffer("differ_losses", torch.zeros(self.options.queue_size))
        self.register_buffer("coeff_state", torch.tensor(float(self.options.coeff)))
        self.register_buffer("step_count", torch.tensor(0))

    @property
    def coeff_loss(self) -> float:
        return float(self.coeff_state)

    def carb_loss(
        self, logits: Tensor, labels: Tensor, local: tuple[tuple[int, int, int, int], Tensor] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The balanced loss of one batch after the warm-up, and what to log; ``local``: the patch window
        and its MaskCLIP labels (the global-local view)."""
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
        if local is not None:  # the patch's CLIP labels split by the same (global) prediction
            (top, left, ph, pw), patch_labels = local
            own = (logits.detach() * present[:, :, None, None]).argmax(1)[:, top : top + ph, left : left + pw]
            patch_logits = logits[:, :, top : top + ph, left : left + pw]
            for part, weight in (
                (patch_labels.masked_fill(patch_labels != own, self.ignore_index), 1.0),
                (patch_labels.masked_fill(patch_labels == own, self.ignore_index), self.coeff_loss),
            ):
                term = _mean_ce(patch_logits, part, self.ignore_index)
                if term is not None:
                    loss = loss + weight * term
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
        local = None
        if self.local_view is not None:
            window = self.local_view.window(*target.shape[-2:])
            top, left, ph, pw = window
            present = present_classes(target, self.num_classes, self.ignore_index)
            local = (
                window,
                self.local_view.labels(batch["image"][:, :, top : top + ph, left : left + pw], present),
            )
        if self.training_progress < self.options.warm_up:
            plain = _mean_ce(logits, target, self.ignore_index)
            loss = logits.sum() * 0.0 if plain is None else plain
            if local is not None:
                (top, left, ph, pw), patch_labels = local
                patch = _mean_ce(
                    logits[:, :, top : top + ph, left : left + pw], patch_labels, self.ignore_index
                )
                loss = loss if patch is None else loss + patch
        else:
            loss, logged = self.carb_loss(logits, target, local)
            for name, value in logged.items():
                self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.train_iou.update(logits.detach().argmax(1), target)
        self.log("train/miou_vs_pseudo_labels", self.train_iou, on_step=False, on_epoch=True, batch_size=size)
        return loss


def local_view(
    clip_model: str, clip_weights: str | None, domain: Any, label_space: Any, config: Any
) -> LocalView:
    """CARB's local view with a local CLIP checkpoint: text embeddings of every class of ``label_space``
    (the domain's prompts; a background class takes the mean of the background words)."""
    from wsss_domains.clip.loading import load_clip
    from wsss_domains.clip.text import ZeroShotText
    from wsss_domains.errors import UserError

    loaded = load_clip(clip_model, clip_weights, device=torch.device("cpu"))
    text = ZeroShotText(loaded.model, loaded.tokenizer, domain.clip_prompts(label_space))
    rows = []
    with torch.no_grad():
        for index, name in enumerate(label_space.classes):
            if index == label_space.background_index:
                words = text.background()
                if not words.numel():
                    raise UserError(
                        f"carb: domain '{domain.name}' gives no background words for the class '{name}'"
                    )
                rows.append(F.normalize(words.float(), dim=-1).mean(0))
            else:
                rows.append(text.foreground([name])[0].float())
    return LocalView(loaded.model, torch.stack(rows), tuple(config.mean), tuple(config.std), seed=config.seed)
