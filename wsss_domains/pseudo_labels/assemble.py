"""Turning normalised CAMs and an image's labels into a pseudo-label map of class ids."""

from __future__ import annotations

import torch
from torch import Tensor

from wsss_domains.domains.contract import BackgroundMode, LabelSpace


def cams_to_labels(
    cams: Tensor,
    present: Tensor,
    label_space: LabelSpace,
    bg_threshold: float | None = None,
    exclude: Tensor | None = None,
) -> Tensor:
    """Arg-max over the present classes' CAMs, with background decided as the domain says.

    ``cams``: ``K x H x W`` in [0, 1] over the label space's foreground classes; ``present``: a
    K-vector (multi-hot) of the image's classes. Returns int64 ``H x W`` class ids; excluded pixels
    (and, without any present class, every non-background pixel) get ``ignore_index``.
    """
    fg_ids = torch.tensor(label_space.foreground, dtype=torch.long, device=cams.device)
    keep = present.bool().to(cams.device)
    scores = cams[keep]
    ids = fg_ids[keep]
    h, w = cams.shape[-2:]
    if label_space.background_mode is BackgroundMode.THRESHOLD:
        if bg_threshold is None:
            raise ValueError("background mode 'threshold' needs bg_threshold")
        bg = torch.full((1, h, w), bg_threshold, dtype=cams.dtype, device=cams.device)
        scores = torch.cat([bg, scores])
        ids = torch.cat([torch.tensor([label_space.background_index], device=cams.device), ids])
    if scores.shape[0] == 0:
        labels = torch.full((h, w), label_space.ignore_index, dtype=torch.long, device=cams.device)
    else:
        labels = ids[scores.argmax(dim=0)]
    if exclude is not None:
        labels = labels.masked_fill(exclude.to(labels.device), label_space.ignore_index)
    return labels


def labels_from_logits(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Predicted multi-hot labels for images whose split carries none (at least the top class)."""
    probs = logits.sigmoid()
    present = probs > threshold
    if not present.any():
        present[probs.argmax()] = True
    return present.float()
