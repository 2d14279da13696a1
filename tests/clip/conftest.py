"""Fixtures for the CLIP tests: a tiny random open_clip model, prompts, an in-memory labelled set."""

from __future__ import annotations

import copy
import socket

import pytest
from clip_testdata import ColourSquares

from wsss_domains.clip.tiny import save_tiny_clip, tiny_clip
from wsss_domains.domains.contract import ClipPrompts


@pytest.fixture(scope="session")
def _tiny_once():
    return tiny_clip(seed=0)


@pytest.fixture
def tiny(_tiny_once):
    """A fresh copy of a tiny random CLIP (32 px, 8 px patches, 3 blocks) and its offline tokenizer."""
    model, tokenizer = _tiny_once
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def tiny_prompts() -> ClipPrompts:
    return ClipPrompts(
        class_names={
            "red thing": ("red thing", "crimson"),
            "green thing": ("green thing",),
            "blue thing": ("blue",),
        },
        templates=("a clean origami {}.", "a photo of {}."),
        background=("ground", "sky", "wall"),
    )


@pytest.fixture
def squares() -> ColourSquares:
    return ColourSquares()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    """The tiny architecture registered with open_clip as 'wsss-tiny-test', and a saved random checkpoint."""
    path, model = save_tiny_clip(tmp_path, "wsss-tiny-test", seed=3)
    return "wsss-tiny-test", path, model
