"""Label-preserving augmentation for overhead imagery: flips and 90-degree rotations.

Seen from above a scene has no up, down, left or right, so the eight symmetries of the square
are all valid views; colour is left alone because spectral values carry class information
(water, vegetation). Odd quarter turns are applied only to square images so that batches of
equally sized tiles stay collatable; flips already give the other symmetries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from wsss_domains.domains.contract import Sample

if TYPE_CHECKING:
    from torch import Tensor

_SPATIAL = ("image", "mask", "exclude")


def _transform(t: Tensor, hflip: bool, vflip: bool, turns: int) -> Tensor:
    if hflip:
        t = t.flip(-1)
    if vflip:
        t = t.flip(-2)
    return torch.rot90(t, turns, dims=(-2, -1)) if turns else t


def flip_rotate(sample: Sample, generator: torch.Generator | None = None) -> Sample:
    """A random element of the dihedral group applied to image, mask and exclude alike."""
    draw = torch.rand(3, generator=generator)
    image = sample["image"]
    turns = int(draw[2] * 4) if image.shape[-1] == image.shape[-2] else 0
    out: Sample = dict(sample)  # type: ignore[assignment]
    for key in _SPATIAL:
        if key in sample:
            out[key] = _transform(sample[key], bool(draw[0] < 0.5), bool(draw[1] < 0.5), turns)  # type: ignore[literal-required]
    return out
