"""Opt-in stain normalisation (MONAI Macenko). Slow only because importing MONAI takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from histo_fixtures import make_wsss4luad
from wsss_adapters.histo import HistoDomain
from wsss_adapters.histo.demo import _render
from wsss_adapters.histo.stain import normalize_stains

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import main
from wsss_domains.domains import create_domain

pytestmark = pytest.mark.slow


def _he_like() -> torch.Tensor:
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
    assert torch.equal(HistoDomain(stain="macenko").preprocess(img), normalize_stains(img))


def _stain_columns(rgb: np.ndarray) -> np.ndarray:
    """The two unit stain vectors (optical density, 3x2) MONAI estimates, H and E in a fixed order."""
    from monai.apps.pathology.transforms import ExtractHEStains

    he = ExtractHEStains()(rgb)
    return he[:, np.argsort(he[1])]  # order by the green component: Macenko's own order is not stable


def test_the_stain_option_maps_the_image_onto_monais_reference_stains():
    """Checked against MONAI called directly, not through the project's helper: the plugin's output is
    MONAI's Macenko normalisation of the image, and its stain basis is MONAI's reference H&E basis
    while the raw image's is not."""
    from monai.apps.pathology.transforms import NormalizeHEStains

    img = _he_like()
    rgb = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = create_domain("histo", stain="macenko").preprocess(img)
    assert torch.equal(create_domain("histo").preprocess(img), img)  # off by default
    out_rgb = (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(out_rgb, NormalizeHEStains()(rgb))
    assert np.abs(out_rgb.astype(int) - rgb.astype(int)).mean() > 5  # the colours did change
    reference = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
    reference = reference[:, np.argsort(reference[1])]
    assert np.abs(_stain_columns(out_rgb) - reference).max() < 0.05
    assert np.abs(_stain_columns(rgb) - reference).max() > 0.1


TINY = ["--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32", "--batch-size", "2"]
TINY += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--max-steps", "2"]
TINY += ["--device", "cpu", "--no-progress", "--runtime", "torch", "--method", "cam"]


def test_run_with_stain_macenko_normalises_in_every_stage_and_records_it(tmp_path: Path, monkeypatch, capsys):
    """``run --domain-option stain=macenko``: the option reaches HistoDomain, is saved in run.json and
    segmenter.json, and a later stage that reloads the run normalises its images again."""
    import wsss_adapters.histo.stain as stain  # HistoDomain.preprocess imports it where it runs

    calls: list[str] = []

    def recorded(image: torch.Tensor) -> torch.Tensor:
        calls.append("macenko")
        return normalize_stains(image)

    monkeypatch.setattr(stain, "normalize_stains", recorded)
    root = make_wsss4luad(tmp_path / "WSSS4LUAD")
    job = tmp_path / "job"
    args = ["run", "--domain", "histo", "--domain-option", "stain=macenko", "--data", str(root)]
    args += ["--train-split", "training", "--test-split", "validation", "--out", str(job)]
    assert main([*args, *TINY]) == 0, capsys.readouterr().err
    assert calls  # the option reached HistoDomain.preprocess
    assert json.loads((job / "classifier" / "run.json").read_text())["domain_options"] == {"stain": "macenko"}
    assert json.loads((job / "segmenter" / "segmenter.json").read_text())["domain_options"] == {
        "stain": "macenko"
    }
    assert json.loads((job / "report.json").read_text())["settings"]["domain_options"] == {"stain": "macenko"}

    calls.clear()
    pl = ["pseudo-labels", "--run", str(job / "classifier"), "--data", str(root), "--split", "validation"]
    assert main([*pl, "--out", str(tmp_path / "pl"), "--no-progress", "--runtime", "torch"]) == 0
    assert len(calls) >= 2  # both validation images, normalised as in training
