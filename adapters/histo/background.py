"""White / glass region detection: the pixels of a histology image that carry no tissue.

Unstained glass and empty alveolar or vessel lumens look white: every channel is bright and the
colour is almost grey. H&E-stained tissue, even pale stroma, keeps a pink or purple tint. The
thresholds below were chosen as round values once, on the whole WSSS4LUAD development split
(agreement with its ``background-mask`` annotations, IoU about 0.75), never per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import Tensor

# Darkest channel at least this bright (about 200/255): glass, not pale eosin.
MIN_BRIGHTNESS = 0.78
# HSV saturation ``(max - min) / max`` at most this: grey-white, not pink.
MAX_SATURATION = 0.15
# Opening removes isolated bright pixels (nuclear halos, JPEG speckle) ...
OPEN_RADIUS = 1
# ... closing then fills pinholes of tissue-coloured noise inside glass.
CLOSE_RADIUS = 2


def _dilate(mask: Tensor, radius: int) -> Tensor:
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask, kernel_size=k, stride=1, padding=radius)


def _erode(mask: Tensor, radius: int) -> Tensor:
    return 1.0 - _dilate(1.0 - mask, radius)


def white_mask(
    image: Tensor,
    min_brightness: float = MIN_BRIGHTNESS,
    max_saturation: float = MAX_SATURATION,
    open_radius: int = OPEN_RADIUS,
    close_radius: int = CLOSE_RADIUS,
) -> Tensor:
    """Bool mask of white / glass pixels for a ``3xHxW`` (or ``Bx3xHxW``) image.

    Float images are read as [0, 1]; uint8 images as [0, 255].
    """
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected a 3xHxW or Bx3xHxW image, got shape {tuple(image.shape)}")
    img = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    batched = img.dim() == 4
    if not batched:
        img = img.unsqueeze(0)
    hi = img.amax(dim=1, keepdim=True)
    lo = img.amin(dim=1, keepdim=True)
    saturation = (hi - lo) / hi.clamp_min(1e-6)
    mask = ((lo >= min_brightness) & (saturation <= max_saturation)).float()
    # Opening, then closing; max-pooling pads with -inf so borders are not eroded spuriously.
    mask = _dilate(_erode(mask, open_radius), open_radius)
    mask = _erode(_dilate(mask, close_radius), close_radius)
    out = mask[:, 0] > 0.5
    return out if batched else out[0]
