"""Opt-in stain normalisation (MONAI Macenko). Slow only because importing MONAI takes seconds."""

from __future__ import annotations

import pytest
import torch
from histo_fixtures import make_wsss4luad
from wsss_adapters.histo import HistoDomain
from wsss_adapters.histo.demo import _render
from wsss_adapters.histo.stain import normalize_stains

pytestmark = pytest.mark.slow


def _he_like() -> torch.Tensor:
    import numpy as np

    ids = np.zeros((64, 64), dtype=np.uint8)
    ids[:, 32:] = 1  # tumour and stroma textures of the demo generator
    rgb = _render(np.random.default_rng(0), ids)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def test_normalize_stains_changes_colour_not_layout(tmp_path):
    img = _he_like()
    out = normalize_stains(img)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float((out - img).abs().mean()) > 0.01
    # Nuclei stay the darkest pixels: normalisation recolours, it does not move structure.
    dark_in, dark_out = img.mean(0) < img.mean(0).quantile(0.1), out.mean(0) < out.mean(0).quantile(0.1)
    assert (dark_in & dark_out).sum() > 0.6 * dark_in.sum()
    glass = torch.full((3, 16, 16), 0.97)
    assert torch.equal(normalize_stains(glass), glass)  # no stain to estimate: unchanged


def test_stain_option_of_loader_and_plugin(tmp_path):
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    spec = HistoDomain().dataset("wsss4luad")
    plain = spec.build(root, "validation")[0]
    normed = spec.build(root, "validation", stain_normalize=True)[0]
    assert plain["meta"]["stain_normalized"] is False and normed["meta"]["stain_normalized"] is True
    assert torch.allclose(normed["image"], normalize_stains(plain["image"]))
    img = _he_like()
    assert torch.equal(HistoDomain(stain_normalize=True).preprocess(img), normalize_stains(img))
