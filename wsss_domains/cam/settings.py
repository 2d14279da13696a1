"""How CAMs are computed and read as labels, declared once for the API and the command line.

``pseudo-labels`` (``--data`` and ``--raster``) offers these fields as options (derived by
``wsss_domains.cli.settings_arguments``); the raster engine's :class:`RasterOptions` extends them.
No torch here, so a parser can be built from it cheaply.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from wsss_domains.settings import setting

DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)
# The largest scale accepted: an image at 8x already costs 64x the pixels of the original.
MAX_SCALE = 8.0

CamNorm = Literal["max", "sigmoid"]
CAM_NORMALIZATIONS: tuple[str, ...] = typing.get_args(CamNorm)


@dataclass
class CamSettings:
    """Scales and flips averaged, how each class map is normalised, and the background threshold."""

    scales: tuple[float, ...] = setting(
        DEFAULT_SCALES, help="CAM scales (image size factors)", metavar="1,0.5"
    )
    flip: bool = setting(True, help="no horizontal-flip averaging")
    cam_norm: CamNorm = setting(
        "max", help="per-class max normalisation (classic CAM) or sigmoid of the averaged pixel logits"
    )
    bg_threshold: float | None = setting(
        None, help="background threshold (threshold-background domains; default: the run's or the method's)"
    )

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or not all(0 < s <= MAX_SCALE for s in self.scales):
            raise ValueError(f"scales must lie in (0, {MAX_SCALE:g}], got {self.scales}")
        if self.cam_norm not in CAM_NORMALIZATIONS:
            raise ValueError(
                f"cam_norm must be one of {', '.join(CAM_NORMALIZATIONS)}, got {self.cam_norm!r}"
            )
