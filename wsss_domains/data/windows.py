"""Window geometry, one module for every place that cuts an image: training patches (grid and
random), tiles of large scenes, CAM tiling, raster windows with their context, and the windows
prediction writes.

Pure arithmetic on sizes; nothing here reads pixels. The network's own sliding window over an
image (blended seams) is MONAI's ``sliding_window_inference`` (``segmentation/inference.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch
    from rasterio.windows import Window


def pair(size: int | tuple[int, int] | list[int], what: str = "patch size") -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair; ValueError for anything not positive."""
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(v) for v in size)
        if len(hw) != 2:
            raise ValueError(f"{what} must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return hw  # type: ignore[return-value]


def grid_starts(length: int, patch: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``; the last window is aligned to the end."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def balanced_tile(length: int, tile: int, overlap: int) -> int:
    """The side of equal tiles, at most ``tile``, that cover ``length`` with ``overlap`` between them.

    Fixed tiles waste work on the last one: 2560 pixels in tiles of 1280 overlapping by 64 take
    three tiles (3840 pixels computed); three balanced tiles of 896 compute 2688.
    """
    if length <= tile:
        return length
    count = math.ceil((length - overlap) / (tile - overlap))
    return min(tile, math.ceil((length - overlap) / count) + overlap)


def random_start(length: int, window: int, generator: torch.Generator | None = None) -> int:
    """A uniformly drawn start of a ``window``-long range inside ``[0, length)`` (0 when it does not fit)."""
    import torch  # here: plugins read this module while `wsss-domains domains` lists them

    return int(torch.randint(0, max(length - window, 0) + 1, (), generator=generator))


class TileWindow(NamedTuple):
    """A window of a raster in pixels: top row, left column, height, width."""

    row: int
    col: int
    height: int
    width: int

    def to_rasterio(self) -> Window:
        from rasterio.windows import Window

        return Window(self.col, self.row, self.width, self.height)


def iter_windows(
    height: int, width: int, tile: int | tuple[int, int], overlap: int = 0
) -> Iterator[TileWindow]:
    """Row-major windows of at most ``tile`` pixels (side, or height and width) covering a raster.

    Neighbours share ``overlap`` pixels; the last row and column of windows are aligned to the
    raster's edge (so they may overlap more) and no window ever extends past it, which is what a
    stitcher needs to paste predictions back at ``(row, col)``.
    """
    th, tw = pair(tile, "tile")
    if not 0 <= overlap < min(th, tw):
        raise ValueError(f"overlap must lie in [0, tile), got {overlap} for tile {tile}")
    if height < 1 or width < 1:
        raise ValueError(f"raster size must be positive, got {height}x{width}")
    for row in grid_starts(height, th, th - overlap):
        for col in grid_starts(width, tw, tw - overlap):
            yield TileWindow(row, col, min(th, height), min(tw, width))


@dataclass(frozen=True)
class WindowPair:
    """A core window (written) and its context window (read and fed to the network)."""

    core: TileWindow
    context: TileWindow

    @property
    def crop(self) -> tuple[slice, slice]:
        """The core's rows and columns inside the context."""
        r, c = self.core.row - self.context.row, self.core.col - self.context.col
        return slice(r, r + self.core.height), slice(c, c + self.core.width)


def _place(start: int, length: int, span: int, total: int) -> int:
    """Start of a ``span``-long range holding ``[start, start + length)``, centred, inside ``[0, total)``."""
    return min(max(start - (span - length) // 2, 0), total - span)


def plan_windows(height: int, width: int, window: int, margin: int) -> list[WindowPair]:
    """Row-major cores of ``window`` pixels tiling the raster, each with its fixed-size context."""
    span_h, span_w = min(height, window + 2 * margin), min(width, window + 2 * margin)
    plan = []
    for row in range(0, height, window):
        h = min(window, height - row)
        crow = _place(row, h, span_h, height)
        for col in range(0, width, window):
            w = min(window, width - col)
            ccol = _place(col, w, span_w, width)
            plan.append(WindowPair(TileWindow(row, col, h, w), TileWindow(crow, ccol, span_h, span_w)))
    return plan
