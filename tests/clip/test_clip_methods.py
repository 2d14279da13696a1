"""The registered CLIP methods: fail fast without weights, and give CLIP-ES maps for present classes."""

from __future__ import annotations

import pytest
import torch

from wsss_domains.clip.clip_es import clip_es_cams
from wsss_domains.clip.loading import ClipWeightsMissing, load_clip
from wsss_domains.domains import BackgroundMode, ClipPrompts, DomainPlugin, LabelSpace
from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.base import RefineContext

SPACE = LabelSpace(("cat", "dog", "tree"), ((1, 1, 1), (2, 2, 2), (3, 3, 3)), BackgroundMode.NONE)


class _Domain(DomainPlugin):
    name = "clip-test"

    def datasets(self):
        return {}

    def clip_prompts(self, label_space):
        return ClipPrompts(
            {"cat": ("cat",), "dog": ("dog", "puppy"), "tree": ("tree",)}, background=("ground",)
        )


def test_clip_methods_are_registered():
    assert {"clip-es", "clip-es-learned"} <= set(list_methods())


def test_missing_weights_fail_at_setup(no_network, tmp_path):
    method = create_method("clip-es", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), (0.5,) * 3, (0.5,) * 3)


def test_refine_replaces_present_channels_with_clip_es(tiny_checkpoint, no_network):
    name, path, _ = tiny_checkpoint
    method = create_method("clip-es", clip_model=name, clip_weights=str(path))
    domain = _Domain()
    method.setup(domain, (0.5,) * 3, (0.5,) * 3)
    image = torch.rand(3, 48, 64)
    cams = torch.rand(3, 48, 64)
    present = torch.tensor([1.0, 0.0, 1.0])
    out = method.refine(cams, RefineContext.of(image, present, domain, SPACE))
    model, tokenizer, *_ = load_clip(name, path)
    expected = clip_es_cams(model, tokenizer, image, ["cat", "tree"], domain.clip_prompts(SPACE))
    assert torch.equal(out[1], cams[1])  # absent class untouched
    assert torch.allclose(out[[0, 2]], expected, atol=1e-5)
    assert not torch.allclose(out[0], cams[0])


def test_learned_variant_needs_an_artefact(tiny_checkpoint, no_network):
    name, path, _ = tiny_checkpoint
    method = create_method("clip-es-learned", clip_model=name, clip_weights=str(path))
    domain = _Domain()
    method.setup(domain, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="prompts learn"):
        method.refine(
            torch.rand(3, 32, 32),
            RefineContext.of(torch.rand(3, 32, 32), torch.tensor([1.0, 1.0, 0.0]), domain, SPACE),
        )
