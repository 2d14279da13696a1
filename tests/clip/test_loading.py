"""Offline CLIP loading: local checkpoints load, anything missing is one clear error, no network."""

from __future__ import annotations

import os

import pytest
import torch

from wsss_domains.clip.loading import (
    ClipCheckpointMismatch,
    ClipUnsupported,
    ClipWeightsMissing,
    load_clip,
    resolve_clip_weights,
)
from wsss_domains.clip.tiny import tiny_model_config
from wsss_domains.models.weights import WeightsNotFound


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the open_clip (~/.cache/clip) and Hugging Face caches at empty folders."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_missing_weights_is_one_clear_error(empty_caches, no_network):
    with pytest.raises(ClipWeightsMissing) as err:
        load_clip("ViT-B-16", None)
    message = str(err.value)
    assert "--clip-weights PATH" in message and "ViT-B-16" in message and "\n" not in message
    assert err.value.exit_code == 2
    assert isinstance(err.value, WeightsNotFound)  # bench shows such cells as "weights not available"
    with pytest.raises(ClipWeightsMissing, match="does not exist"):
        resolve_clip_weights("ViT-B-16", empty_caches / "nope.pt")
    with pytest.raises(ClipWeightsMissing, match="not in the local cache"):
        resolve_clip_weights("ViT-B-16", "openai")
    with pytest.raises(ClipUnsupported, match="unknown open_clip architecture"):
        resolve_clip_weights("ViT-Nope-1", None)


def test_cached_tag_is_found_without_network(empty_caches, no_network):
    import open_clip

    url = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["url"]
    cached = empty_caches / "home" / ".cache" / "clip" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder")
    assert resolve_clip_weights("ViT-B-16", None) == cached
    assert resolve_clip_weights("ViT-B-16", "openai") == cached


def test_hf_tokenizer_models_are_refused_unless_offline(empty_caches, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ClipUnsupported, match="HF_HUB_OFFLINE=1"):
        resolve_clip_weights("ViT-B-16-SigLIP", None)


def test_local_checkpoint_loads_exactly(tiny_checkpoint, no_network):
    name, path, reference = tiny_checkpoint
    model, tokenizer, weights, model_name = load_clip(name, path)
    assert weights == path and model_name == name and not model.training
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert tokenizer(["a photo"]).shape == (1, 32)
    folder = path.parent / "ckpt"
    folder.mkdir()
    path.rename(folder / "open_clip_pytorch_model.bin")
    assert resolve_clip_weights(name, folder) == folder / "open_clip_pytorch_model.bin"


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_checkpoint, tmp_path, no_network):
    import json

    import open_clip

    _, path, _ = tiny_checkpoint
    wider = tiny_model_config(width=96)
    (tmp_path / "configs" / "wsss-tiny-wide.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path / "configs")
    with pytest.raises(ClipCheckpointMismatch, match="does not fit open_clip architecture 'wsss-tiny-wide'"):
        load_clip("wsss-tiny-wide", path)
