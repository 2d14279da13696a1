"""sam-label-probe: label-probe's fit on SAM window embeddings (a tiny random SAM; no weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from probe_setup import TWO, Plain, cached_context, ready, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sam"))
from sam_fixtures import TINY_DIM, TINY_SIZE, build_tiny_sam  # noqa: E402

from wsss_domains.methods import create_method, list_methods  # noqa: E402
from wsss_domains.methods.base import RefineContext  # noqa: E402
from wsss_domains.methods.sam_probe import window_cells  # noqa: E402
from wsss_domains.sam.registry import LoadedSam  # noqa: E402


def tiny_sam() -> LoadedSam:
    return LoadedSam(model=build_tiny_sam(), name="tiny_test", checkpoint_id="random-init-seed0")


def embedding(sam: LoadedSam, image: torch.Tensor) -> torch.Tensor:
    """SAM's own path for an image whose long side is already the input size: x255, normalise, pad, encode."""
    with torch.no_grad():
        return sam.model.image_encoder(sam.model.preprocess(image[None] * 255.0))


def test_registered_and_options_checked():
    assert "sam-label-probe" in list_methods()
    with pytest.raises(ValueError, match="features"):
        create_method("sam-label-probe", features="clip")
    with pytest.raises(ValueError, match="window"):
        create_method("sam-label-probe", window=8)


def test_a_missing_checkpoint_fails_at_setup():
    method = create_method(
        "sam-label-probe", sam_model="lite_medsam", sam_checkpoint="/nowhere/lite_medsam.pth"
    )
    with pytest.raises(FileNotFoundError, match="/nowhere/lite_medsam.pth"):
        method.setup(Plain(), (0.5,) * 3, (0.25,) * 3)


def test_window_cells_drop_sams_padding():
    emb = torch.randn(1, 4, 8, 8)
    assert window_cells(emb, (64, 32), 64).shape[-2:] == (8, 4)  # long side 64: 32 px -> 4 of 8 cells
    assert window_cells(emb, (20, 40), 64).shape[-2:] == (4, 8)  # resized to 32 x 64


def test_one_window_gives_sams_embedding_on_the_grid_and_the_colour():
    sam = tiny_sam()
    method = create_method("sam-label-probe", window=TINY_SIZE, grid=8, sam=sam)
    ready(method, tiny_model())
    image = torch.rand(3, TINY_SIZE, TINY_SIZE)
    feats = method._features(image, Plain())
    assert feats.shape == (1, TINY_DIM + 12, 8, 8)  # 64 px at 8 px per cell; 4 blurs x 3 colours
    torch.testing.assert_close(feats[:, :TINY_DIM], embedding(sam, image), atol=1e-5, rtol=1e-4)


def test_overlapping_windows_are_averaged_where_they_meet():
    sam = tiny_sam()
    method = create_method("sam-label-probe", window=TINY_SIZE, grid=8, sam=sam)
    ready(method, tiny_model())
    image = torch.rand(3, TINY_SIZE, 96)  # windows at x = 0 and x = 32 (the last aligned to the edge)
    feats = method._features(image, Plain())[:, :TINY_DIM]
    left, right = embedding(sam, image[:, :, :64]), embedding(sam, image[:, :, 32:])
    expected = torch.zeros(1, TINY_DIM, 8, 12)
    expected[..., :4] = left[..., :4]
    expected[..., 4:8] = (left[..., 4:] + right[..., :4]) / 2
    expected[..., 8:] = right[..., 4:]
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)


def test_with_the_backbone_the_cnn_features_come_first(tmp_path: Path):
    sam = tiny_sam()
    model = tiny_model()
    both = create_method("sam-label-probe", features="sam+backbone", window=TINY_SIZE, sam=sam)
    plain = create_method("label-probe")
    ready(both, model)
    ready(plain, model)
    image = torch.rand(3, 64, 64)
    cnn = plain._features(image, Plain())
    feats = both._features(image, Plain())
    assert feats.shape[1] == cnn.shape[1] + TINY_DIM
    torch.testing.assert_close(feats[:, : cnn.shape[1]], cnn)


def test_fit_caches_under_its_own_name_and_refine_fuses(tmp_path: Path):
    sam = tiny_sam()
    method = create_method("sam-label-probe", window=TINY_SIZE, steps=10, sam=sam)
    extractor = ready(method, tiny_model())
    torch.manual_seed(2)
    windows = []
    for i in range(4):
        image = torch.rand(3, 64, 64) * 0.2
        image[0, :, :32] += 0.7
        windows.append({"image": image, "label": torch.tensor([1.0, float(i % 2)]), "id": str(i)})
    method.fit(cached_context(windows, extractor, tmp_path))
    assert len(list(tmp_path.glob("sam-label-probe-*.pt"))) == 1
    cams = torch.rand(2, 64, 64)
    image = windows[1]["image"]
    out = method.refine(cams, RefineContext.of(image, torch.tensor([1.0, 1.0]), Plain(), TWO))
    logits = method.probe(method._features(image, Plain()))[0]
    probs = F.interpolate(logits.softmax(0)[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, 0.5 * cams + 0.5 * probs, atol=1e-5, rtol=1e-4)


def test_window_embeddings_are_read_back_from_the_disk_cache(tmp_path: Path):
    sam = tiny_sam()
    encoded: list[int] = []
    sam.model.image_encoder.register_forward_hook(lambda *_: encoded.append(1))
    image = torch.rand(3, TINY_SIZE, 96)  # two windows

    def features(cache: str) -> torch.Tensor:
        method = create_method("sam-label-probe", window=TINY_SIZE, grid=8, sam=sam, sam_cache=cache)
        ready(method, tiny_model())
        return method._features(image, Plain())

    first = features(str(tmp_path / "cache"))
    assert len(encoded) == 2 and len(list((tmp_path / "cache").rglob("*.pt"))) == 2
    again = features(str(tmp_path / "cache"))  # a new method instance, as in the next fold or run
    assert len(encoded) == 2
    torch.testing.assert_close(again, first)
    features("none")
    assert len(encoded) == 4 and len(list(tmp_path.rglob("*.pt"))) == 2
