"""Label-preserving augmentation for histology classifiers.

Tissue on a slide has no up or down, so every flip and 90-degree rotation is a valid view. Stain
intensity varies between slides, so a mild per-channel colour jitter teaches some colour
invariance without turning eosin pink into haematoxylin purple.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wsss_domains.domains.contract import Sample

# Per-channel gain in [1 - GAIN, 1 + GAIN] and a shared brightness shift in [-SHIFT, SHIFT].
GAIN = 0.05
SHIFT = 0.04
_SPATIAL = ("image", "mask", "exclude")


def _geometric(t: Tensor, hflip: bool, vflip: bool, quarter_turns: int) -> Tensor:
    if hflip:
        t = t.flip(-1)
    if vflip:
        t = t.flip(-2)
    if quarter_turns:
        t = torch.rot90(t, quarter_turns, dims=(-2, -1))
    return t


def histo_augment(sample: Sample, generator: torch.Generator | None = None) -> Sample:
    """Random flips, a random 90-degree rotation and a mild colour jitter; masks follow the image.

    Odd quarter turns are applied only to square images so the image keeps its shape (batches
    of equally sized crops stay collatable); flips already give the other symmetries.
    """
    draw = torch.rand(4, generator=generator)
    image = sample["image"]
    square = image.shape[-1] == image.shape[-2]
    turns = int(draw[2] * 4) if square else 0
    out: Sample = dict(sample)  # type: ignore[assignment]
    for key in _SPATIAL:
        if key in sample:
            out[key] = _geometric(sample[key], bool(draw[0] < 0.5), bool(draw[1] < 0.5), turns)  # type: ignore[literal-required]
    gain = 1.0 + GAIN * (2.0 * torch.rand(3, 1, 1, generator=generator) - 1.0)
    shift = SHIFT * (2.0 * draw[3] - 1.0)
    out["image"] = (out["image"] * gain + shift).clamp_(0.0, 1.0)
    return out
