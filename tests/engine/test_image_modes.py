"""Images of every bit depth and mode read as RGB in [0, 1]; wide greyscale by its own range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_domains.data.io import DataError, read_rgb


def test_16_bit_greyscale_is_scaled_by_its_range_not_clipped_to_white(tmp_path: Path):
    values = np.linspace(100, 4095, 48 * 64).reshape(48, 64).astype(np.uint16)  # 12 bits in a 16-bit PNG
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = read_rgb(tmp_path / "g16.png")
    expected = torch.from_numpy((values - 100.0) / (4095.0 - 100.0)).float()
    assert image.shape == (3, 48, 64) and torch.allclose(image[1], expected, atol=1e-6)
    assert torch.equal(image[0], image[2])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_eight_bit_modes_become_rgb(tmp_path: Path, mode: str):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}")
    image = read_rgb(next(tmp_path.iterdir()))
    assert image.shape == (3, 8, 8) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


def test_float_images_with_no_finite_value_are_refused_by_name(tmp_path: Path):
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="nan.tif: holds no finite pixel value"):
        read_rgb(tmp_path / "nan.tif")
    Image.fromarray(np.full((4, 4), 7.0, dtype=np.float32)).save(tmp_path / "flat.tif")
    assert float(read_rgb(tmp_path / "flat.tif").abs().max()) == 0.0  # a constant image: no range, black


def test_atomic_writes_follow_the_umask(tmp_path: Path):
    import os

    from wsss_domains.data.io import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
