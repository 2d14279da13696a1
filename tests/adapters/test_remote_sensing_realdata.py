"""Smoke test of the remote-sensing loaders on the real development samples (skips without them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from wsss_adapters.remote_sensing import RemoteSensingDomain, dubai

from wsss_domains.domains.contract import IGNORE_INDEX

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def rs(shared_data):
    return shared_data / "remote_sensing"


def test_each_sample_is_detected_as_its_dataset(rs):
    domain = RemoteSensingDomain()
    found = {name: domain.detect_dataset(rs / name).name for name in sorted(p.name for p in rs.iterdir())}
    assert found == {
        "deepglobe-sample": "deepglobe",
        "dubai-aerial": "dubai-aerial",
        "loveda-sample": "loveda",
        "vaihingen-sample": "vaihingen",
    }


def test_deepglobe_tiles_cover_the_whole_image_labels(rs):
    spec = RemoteSensingDomain().dataset("deepglobe")
    whole = spec.build(rs / "deepglobe-sample", "train[0:1]")
    assert len(whole) == 1
    s = whole[0]
    assert s["image"].shape == (3, 2448, 2448) and s["mask"].shape == (2448, 2448)
    assert set(s["mask"].unique().tolist()) <= {*range(6), IGNORE_INDEX}
    tiles = spec.build(rs / "deepglobe-sample", "train[0:1]", labels_from_masks=True, patch_size=612)
    assert len(tiles) == 16
    union = torch.zeros_like(s["label"])
    for i in range(len(tiles)):
        t = tiles[i]
        assert t["image"].shape == (3, 612, 612) and t["meta"]["parent"] == s["id"]
        union = torch.maximum(union, t["label"])
    assert torch.equal(union, s["label"])  # every pixel lies in some tile


def test_converted_id_masks_follow_the_stored_ids(rs):
    domain = RemoteSensingDomain()
    for folder, name, split in (("loveda-sample", "loveda", "val"), ("vaihingen-sample", "vaihingen", "val")):
        ds = domain.dataset(name).build(rs / folder, split)
        assert len(ds) >= 1
        for i in range(len(ds)):
            s = ds[i]
            raw = torch.from_numpy(
                np.array(Image.open(s["meta"]["path"].replace("img_dir", "ann_dir")))
            ).long()
            assert torch.equal(s["mask"], torch.where(raw == 0, IGNORE_INDEX, raw - 1))
            assert s["image"].shape[-2:] == s["mask"].shape and bool(s["label"].any())


def test_dubai_palette_tiles_decode_like_their_rgb_rendering(rs):
    ds = dubai.build(rs / "dubai-aerial", "Tile 2,Tile 4")
    assert len(ds) == 18
    colours = {c: i for i, c in enumerate(dubai.PALETTE)}
    for i in range(len(ds)):
        s = ds[i]
        mask_path = s["meta"]["path"].replace("/images/", "/masks/").replace(".jpg", ".png")
        rgb = np.asarray(Image.open(mask_path).convert("RGB")).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        expected = np.full(code.shape, IGNORE_INDEX)
        for (r, g, b), k in colours.items():
            expected[code == (r << 16) | (g << 8) | b] = k
        assert torch.equal(s["mask"], torch.from_numpy(expected))
