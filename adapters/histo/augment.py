"""Label-preserving augmentation for histology classifiers.

Tissue on a slide has no up or down, so every flip and 90-degree rotation is a valid view. Stain
intensity varies between slides, so the colours are jittered in haematoxylin-eosin-DAB optical
density space (Tellez et al., 2018, "H&E stain augmentation"): each stain's concentration is scaled
and shifted a little, which mimics a lighter or darker staining of the same tissue without turning
eosin pink into haematoxylin purple; a mild brightness shift follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from wsss_domains.domains.contract import Sample

if TYPE_CHECKING:
    from torch import Tensor

SHIFT = 0.04  # shared brightness shift in [-SHIFT, SHIFT]
# HED jitter: stain concentrations c -> c * U(1 - HED_SCALE, 1 + HED_SCALE) + U(-HED_BIAS, HED_BIAS),
# the "HED-light" setting of Tellez et al. (sigma 0.05).
HED_SCALE = 0.05
HED_BIAS = 0.05
# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in RGB optical density.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1e-6


def hed_jitter(image: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``3 x H x W`` RGB in [0, 1] with stain concentrations ``c * scale + bias`` (3-vectors, H, E, D).

    Optical density ``-log(rgb)`` is linear in the stain concentrations (Beer-Lambert), so the
    jitter is a change of basis, an affine map per stain and the way back. Identity for scale 1, bias 0.
    """
    od = -torch.log(image.clamp_min(_OD_FLOOR))
    hed = torch.einsum("chw,cs->shw", od, _HED_FROM_RGB.to(image))
    hed = hed * scale.to(image)[:, None, None] + bias.to(image)[:, None, None]
    od = torch.einsum("shw,sc->chw", hed, _RGB_FROM_HED.to(image))
    return torch.exp(-od).clamp(0.0, 1.0)


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
    """Random flips, a random 90-degree rotation and H&E stain jitter; masks follow the image.

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
    stain = 2.0 * torch.rand(2, 3, generator=generator) - 1.0
    image = hed_jitter(out["image"], 1.0 + HED_SCALE * stain[0], HED_BIAS * stain[1])
    shift = SHIFT * (2.0 * draw[3] - 1.0)
    out["image"] = (image + shift).clamp_(0.0, 1.0)
    return out
