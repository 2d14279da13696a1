"""Learned prompts: CoOp wiring, training, frozen weights, artefact round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from wsss_domains.clip.artefacts import (
    LearnedPromptsError,
    frozen_checksum,
    list_learned_prompts,
    load_learned_prompts,
    save_learned_prompts,
)
from wsss_domains.clip.clip_es import clip_es_cams
from wsss_domains.clip.learned_prompts import (
    PromptLearner,
    PromptTrainConfig,
    class_vs_background_loss,
    dataset_loss,
    train_prompts,
)
from wsss_domains.clip.vit import prepare_pixels

CLASSES = {"red thing": "red thing,crimson", "green thing": "green thing", "blue thing": "blue"}


def test_initial_context_reproduces_the_text_prompt(tiny):
    model, tokenizer = tiny
    learner = PromptLearner(model, tokenizer, CLASSES, ["ground", "blue sky"])
    assert learner.n_ctx == 4
    with torch.no_grad():
        expected = model.encode_text(tokenizer([f"a photo of a {t}." for t in CLASSES.values()]))
        background = model.encode_text(tokenizer(["a photo of a ground.", "a photo of a blue sky."]))
        assert torch.allclose(learner.foreground(), F.normalize(expected, dim=-1), atol=1e-6)
        assert torch.allclose(learner.background(), F.normalize(background, dim=-1), atol=1e-6)
        picked = learner.foreground(["blue thing", "red thing"])
        assert torch.allclose(picked, learner.foreground()[[2, 0]], atol=1e-6)
    assert [tuple(e.shape) for e in learner.background_embeddings] == [(1, 32), (2, 32)]
    random_init = PromptLearner(model, tokenizer, CLASSES, ["ground"], ctx_init=None, n_ctx=6)
    assert random_init.ctx.shape == (6, 32) and random_init.ctx.std() < 0.05
    with torch.no_grad():
        assert torch.allclose(random_init.foreground().norm(dim=-1), torch.ones(3))


def test_loss_is_bce_of_class_against_background():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])  # two classes, two background prompts
    labels = torch.tensor([[1.0, 0.0]])
    bg = torch.logsumexp(torch.tensor([0.5, 0.0]), 0)
    p = torch.sigmoid(torch.tensor([2.0, -1.0]) - bg)
    expected = -(torch.log(p[0]) + torch.log(1 - p[1])) / 2
    assert torch.allclose(class_vs_background_loss(logits, labels), expected, atol=1e-6)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True])
def test_training_lowers_loss_and_changes_only_learned_parameters(tiny, tiny_prompts, squares, lora):
    model, tokenizer = tiny
    checksum = frozen_checksum(model)
    before = _snapshot(model)
    untrained = PromptLearner(copy.deepcopy(model), tokenizer, CLASSES, tiny_prompts.background)
    initial_loss = dataset_loss(untrained, squares)
    config = PromptTrainConfig(epochs=6, batch_size=8, lr=2e-2, lora=lora)
    result = train_prompts(model, tokenizer, squares, tiny_prompts, config)
    learner = result.learner
    final_loss = dataset_loss(learner, squares)
    assert final_loss < 0.8 * initial_loss
    assert len(result.epoch_losses) == 6
    # frozen CLIP weights bit-identical; checksum ignores only the adapters
    assert frozen_checksum(model) == checksum
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(learner.ctx, untrained.ctx)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(learner.background_embeddings, untrained.background_embeddings, strict=True)
    )
    lora_weights = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert bool(lora_weights) == lora
    if lora:
        assert any(v.abs().sum() > 0 for v in lora_weights.values())  # B starts at zero, so it trained
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert any(n.startswith("visual.") for n in trainable) and any(
            n.startswith("transformer.") for n in trainable
        )


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip_reproduces_logits_exactly(tiny, tiny_prompts, squares, tmp_path, lora):
    model, tokenizer = tiny
    pristine = copy.deepcopy(model)
    result = train_prompts(
        model, tokenizer, squares, tiny_prompts, PromptTrainConfig(epochs=2, batch_size=8, lora=lora)
    )
    folder = save_learned_prompts(
        result.learner, tmp_path / "remote-sensing" / "ctx4", clip_model="wsss-tiny", domain="remote-sensing"
    )
    files = {p.name for p in folder.iterdir()}
    assert {"manifest.json", "context.safetensors"} <= files
    assert ({"adapter_config.json", "adapter_model.safetensors"} <= files) == lora
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["n_ctx"] == 4
    assert manifest["frozen_checksum"] == frozen_checksum(pristine)
    assert manifest["clip_model"] == "wsss-tiny" and manifest["created"]

    loaded = load_learned_prompts("ctx4", pristine, tokenizer, domain="remote-sensing", root=tmp_path)
    pixels = torch.cat([prepare_pixels(model, squares[i]["image"], (32, 32)) for i in range(4)])
    with torch.no_grad():
        assert torch.equal(loaded.similarity_logits(pixels), result.learner.similarity_logits(pixels))
    image = squares[0]["image"]
    cams = clip_es_cams(pristine, tokenizer, image, ["red thing", "blue thing"], tiny_prompts, text=loaded)
    again = clip_es_cams(
        model, tokenizer, image, ["red thing", "blue thing"], tiny_prompts, text=result.learner
    )
    assert torch.equal(cams, again)
    listed = list_learned_prompts(tmp_path)
    assert [m["name"] for m in listed] == ["ctx4"] and listed[0]["domain"] == "remote-sensing"


def test_loading_onto_other_weights_is_refused(tiny, tiny_prompts, squares, tmp_path):
    model, tokenizer = tiny
    other = copy.deepcopy(model)
    result = train_prompts(model, tokenizer, squares, tiny_prompts, PromptTrainConfig(epochs=1, batch_size=8))
    save_learned_prompts(result.learner, tmp_path / "p", clip_model="wsss-tiny")
    with torch.no_grad():
        other.visual.proj.add_(1e-3)
    with pytest.raises(LearnedPromptsError, match="other CLIP weights"):
        load_learned_prompts(tmp_path / "p", other, tokenizer)
    with pytest.raises(LearnedPromptsError, match="no learned prompts"):
        load_learned_prompts(tmp_path / "missing", other, tokenizer)


def test_labels_must_match_the_prompted_classes(tiny, tiny_prompts):
    model, tokenizer = tiny
    bad = [{"image": torch.rand(3, 32, 32), "label": torch.ones(2), "id": "x"}]
    with pytest.raises(ValueError, match="2 labels for 3 prompted classes"):
        train_prompts(model, tokenizer, bad, tiny_prompts, PromptTrainConfig(epochs=1))


def test_frozen_text_encodes_each_class_once_and_gives_the_learners_features(tiny, monkeypatch):
    from wsss_domains.clip.text import FrozenText

    model, tokenizer = tiny
    learner = PromptLearner(model, tokenizer, CLASSES, ["ground", "blue sky"], ctx_init=None)
    with torch.no_grad():
        expected_fg, expected_bg = learner.foreground(list(CLASSES)), learner.background()
    calls: list[list[str]] = []
    original = learner.foreground
    monkeypatch.setattr(
        learner, "foreground", lambda names=None: calls.append(list(names)) or original(names)
    )
    frozen = FrozenText(learner)
    first = frozen.foreground(["blue thing", "red thing"])
    again = frozen.foreground(["red thing", "green thing", "blue thing"])
    assert calls == [["blue thing", "red thing"], ["green thing"]]  # only classes not seen before
    assert torch.allclose(first, expected_fg[[2, 0]], atol=1e-6)
    assert torch.allclose(again, expected_fg[[0, 1, 2]], atol=1e-6)
    assert torch.equal(frozen.background(), frozen.background()) and torch.allclose(
        frozen.background(), expected_bg
    )
    assert not again.requires_grad  # the learner's parameters are out of the graph
