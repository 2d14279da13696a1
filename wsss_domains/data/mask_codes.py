"""How a dataset stores class ids in its masks: RGB colour codes or integer ids.

A code turns the raw values of one mask window into class ids of the dataset's label space
(``IGNORE_INDEX`` for unscored pixels). An unknown value raises :class:`UnknownCode` with its
position, which the raster reader turns into a :class:`DataError` naming the file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from wsss_domains.domains.contract import IGNORE_INDEX

RGB = tuple[int, int, int]


class UnknownCode(ValueError):
    """A mask value that no class uses; ``position`` is (row, col) inside the decoded window."""

    def __init__(self, what: str, value: object, position: tuple[int, int]) -> None:
        super().__init__(f"{what} {value} at {position} is not a known class {what}")
        self.what = what
        self.value = value
        self.position = position


class MaskCode(ABC):
    """Decodes raw mask values (``h x w`` ids or ``h x w x 3`` RGB) into int64 class ids.

    Pixels flagged in ``skip`` (the mask raster's own no-data) become ``IGNORE_INDEX`` whatever
    value they hold, so a nodata value outside the code is no error.
    """

    wants_rgb: ClassVar[bool]

    @abstractmethod
    def decode(self, values: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray: ...


def _first(bad: np.ndarray) -> tuple[int, int]:
    y, x = np.argwhere(bad)[0]
    return int(y), int(x)


@dataclass(frozen=True)
class ColorCode(MaskCode):
    """RGB colour -> class id (``IGNORE_INDEX`` allowed).

    ``threshold`` binarises each channel at that value before matching, for codes made only of
    0/255 channels whose masks went through JPEG (DeepGlobe): the official DeepGlobe scripts and
    torchgeo read them the same way. Without it colours must match exactly.
    """

    colors: Mapping[RGB, int]
    threshold: int | None = None
    wants_rgb: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.threshold is not None:
            off = [c for c in self.colors if any(v not in (0, 255) for v in c)]
            if off:
                raise ValueError(f"thresholded colour codes must use only 0 and 255, got {off}")

    def decode(self, values: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        rgb = values.astype(np.int64)
        if self.threshold is not None:
            rgb = np.where(rgb >= self.threshold, 255, 0)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in self.colors), dtype=np.int64)
        by_key = {(r << 16) | (g << 8) | b: cls for (r, g, b), cls in self.colors.items()}
        ids = np.array([by_key[int(k)] for k in keys], dtype=np.int64)
        pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
        known = keys[pos] == code
        if skip is not None:
            known |= skip
        if not known.all():
            y, x = _first(~known)
            raise UnknownCode("colour", tuple(int(v) for v in values[y, x]), (y, x))
        out = ids[pos]
        if skip is not None:
            out[skip] = IGNORE_INDEX
        return out


@dataclass(frozen=True)
class IdCode(MaskCode):
    """Stored integer id -> class id (``IGNORE_INDEX`` allowed); other stored ids are errors."""

    ids: Mapping[int, int]
    wants_rgb: ClassVar[bool] = False

    @classmethod
    def identity(cls, num_classes: int, ignore_index: int = IGNORE_INDEX) -> IdCode:
        """Masks that already hold class ids ``0..num_classes-1`` and the ignore index."""
        return cls({**{i: i for i in range(num_classes)}, ignore_index: ignore_index})

    def decode(self, values: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        if values.ndim != 2:
            raise ValueError(f"id masks are single-channel, got shape {values.shape}")
        lut = np.full(max(self.ids) + 1, -1, dtype=np.int64)
        for stored, cls in self.ids.items():
            lut[stored] = cls
        raw = values.astype(np.int64)
        inside = (raw >= 0) & (raw < len(lut))
        out = np.full(raw.shape, -1, dtype=np.int64)
        out[inside] = lut[raw[inside]]
        if skip is not None:
            out[skip] = IGNORE_INDEX
        bad = out < 0
        if bad.any():
            y, x = _first(bad)
            raise UnknownCode("id", int(raw[y, x]), (y, x))
        return out
