"""Optional H&E stain normalisation (Macenko, via MONAI), off unless a loader or the plugin asks.

Stain colour varies between labs and scanners far more than tissue does; mapping every image to
one reference H&E basis removes part of that nuisance. It is opt-in because it costs time per
image and can hurt on images that are mostly glass, where the stain basis is ill-defined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import Tensor


def normalize_stains(image: Tensor) -> Tensor:
    """Macenko-normalise a ``3xHxW`` float image in [0, 1]; unchanged where no stain is found."""
    from monai.apps.pathology.transforms import NormalizeHEStains  # heavy import, only when used

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    try:
        out = NormalizeHEStains()(array)
    except (ValueError, np.linalg.LinAlgError):
        # All glass (no pixel above the absorbance threshold) or a degenerate stain basis.
        return image
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float().div_(255.0)
