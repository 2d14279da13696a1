"""The PASCAL VOC colour map, also used to colour COCO's 81 classes.

Colour ``i`` spreads the bits of ``i`` over the three channels, most significant first (bit 0 to
red, bit 1 to green, bit 2 to blue, then the next three bits one position lower), which is how
the VOC development kit colours its palette PNGs; index 255 (void) comes out as (224, 224, 192).
"""

from __future__ import annotations


def voc_color(index: int) -> tuple[int, int, int]:
    """The VOC colour of palette index ``index`` (0..255)."""
    if not 0 <= index <= 255:
        raise ValueError(f"palette index must lie in 0..255, got {index}")
    rgb = [0, 0, 0]
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[channel] |= (index & 1) << shift
            index >>= 1
    return rgb[0], rgb[1], rgb[2]


def voc_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """The first ``count`` VOC colours."""
    return tuple(voc_color(i) for i in range(count))
