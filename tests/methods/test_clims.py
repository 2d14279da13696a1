"""CLIMS: each loss against the official formulas (written out here), training, registration, no weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clims_reference import official_clims_losses
from clip_setup import MEAN, STD, clip_method, tiny_clip
from method_training import FAST_BACKBONE, train_steps

from wsss_domains.cli import main
from wsss_domains.clip.loading import ClipWeightsMissing, load_clip
from wsss_domains.domains import ClipPrompts, DomainPlugin
from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.clims import VOC_BACKGROUND
from wsss_domains.models.classifier import CamClassifier

CLASSES = ["cat", "tree"]


class _Domain(DomainPlugin):
    name = "clims-test"

    def __init__(self, background: tuple[str, ...] = ("ground", "sky", "wall")) -> None:
        self.background = background

    def datasets(self):
        return {}

    def clip_prompts(self, label_space):
        return ClipPrompts({"cat": ("kitty", "cat"), "tree": ("tree",)}, background=self.background)


@pytest.fixture
def tiny_weights(tmp_path):
    return tiny_clip(tmp_path, "wsss-tiny-clims", seed=5)


def _method(tiny_weights, domain=None, **options):
    return clip_method("clims", tiny_weights, domain or _Domain(), classes=CLASSES, **options)


def _official_losses(clip, tokenizer, image, cams, label, texts, background, threshold):
    """The official losses with each pair matched to its class's text."""
    pair_texts = [texts[int(k)] for k in torch.nonzero(label == 1)[:, 1]]
    return official_clims_losses(
        clip, tokenizer, image, cams, label, pair_texts, background, threshold, MEAN, STD
    )


def test_losses_follow_the_official_formulas(tiny_weights):
    name, path = tiny_weights
    clip, tokenizer, *_ = load_clip(name, path)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(3, 3, 40, 48, generator=gen)
    cams = torch.randn(3, 2, 5, 6, generator=gen) * 2
    label = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texts = ["a photo of kitty.", "a photo of tree."]  # the domain's first name per class
    background = [f"a photo of {w}." for w in ("ground", "sky", "wall")]
    # A threshold in the middle of the similarities, so the CBS mask keeps some pairs and drops others.
    _, sims = _official_losses(clip, tokenizer, image, cams, label, texts, background, 0.0)
    ordered = sims.flatten().sort().values
    middle = ordered.numel() // 2
    threshold = float(ordered[middle - 1] + ordered[middle]) / 2  # between two similarities, not on one
    expected, sims = _official_losses(clip, tokenizer, image, cams, label, texts, background, threshold)
    assert 0 < int((sims > threshold).sum()) < sims.numel()

    method = _method(tiny_weights, cbs_threshold=threshold)
    given = cams.clone().requires_grad_(True)
    batch = {"image": image, "label": label, "progress": torch.tensor(0.5)}
    losses = method.training_losses(None, torch.nn.ModuleDict(), batch, {"cams": given})
    weights = {"otm": 10.0, "btm": 24.0, "cbs": 1.0, "reg": 0.2}
    assert set(losses) == set(weights)
    for key, weight in weights.items():
        assert torch.allclose(losses[key], weight * expected[key], rtol=1e-5, atol=1e-6), key
    assert float(expected["cbs"]) != 0

    # Gradients reach the maps through CLIP the same way.
    sum(losses.values()).backward()
    reference = cams.clone().requires_grad_(True)
    official, _ = _official_losses(clip, tokenizer, image, reference, label, texts, background, threshold)
    sum(weights[k] * v for k, v in official.items()).backward()
    scale = float(reference.grad.abs().max())
    assert scale > 0 and torch.allclose(given.grad, reference.grad, rtol=1e-4, atol=1e-6 * scale)


def test_background_words_from_the_domain_else_the_official_voc_list(tiny_weights):
    classes, background = _method(tiny_weights).texts(2)
    assert classes == ["a photo of kitty.", "a photo of tree."]
    assert background == ["a photo of ground.", "a photo of sky.", "a photo of wall."]
    _, official = _method(tiny_weights, domain=_Domain(background=())).texts(2)
    assert official == [f"a photo of {w}." for w in VOC_BACKGROUND]


def test_no_clims_loss_before_start_progress_or_without_present_classes(tiny_weights):
    method = _method(tiny_weights)  # default start_progress 0.25
    cams = torch.randn(2, 2, 4, 4, requires_grad=True)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.ones(2, 2), "progress": torch.tensor(0.1)}
    assert all(
        float(v.detach()) == 0 for v in method.training_losses(None, None, batch, {"cams": cams}).values()
    )
    assert method._loaded is None  # CLIP not even loaded
    batch = {**batch, "label": torch.zeros(2, 2), "progress": torch.tensor(0.9)}
    assert all(
        float(v.detach()) == 0 for v in method.training_losses(None, None, batch, {"cams": cams}).values()
    )


def test_training_lowers_the_loss_and_moves_only_the_classifier(tiny_weights):
    torch.manual_seed(0)
    method = _method(tiny_weights, start_progress=0.0)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    model.train()
    gen = torch.Generator().manual_seed(2)
    batch = {
        "image": torch.randn(2, 3, 32, 32, generator=gen),
        "label": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        "progress": torch.tensor(0.5),
    }
    # The CLIMS terms alone reach the classifier's head.
    outputs = method.forward(model, torch.nn.ModuleDict(), batch)
    sum(method.training_losses(model, torch.nn.ModuleDict(), batch, outputs).values()).backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    model.zero_grad()

    clip_before = {k: v.clone() for k, v in method._loaded.model.state_dict().items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(6):
        outputs = method.forward(model, torch.nn.ModuleDict(), batch)
        loss = F.binary_cross_entropy_with_logits(outputs["logits"], batch["label"])
        loss = loss + sum(method.training_losses(model, torch.nn.ModuleDict(), batch, outputs).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        totals.append(float(loss))
    assert totals[-1] < totals[0], totals
    clip_after = method._loaded.model.state_dict()
    assert all(torch.equal(clip_before[k], clip_after[k]) for k in clip_before)
    assert not any(p.requires_grad for p in method._loaded.model.parameters())
    assert any(not torch.equal(model_before[k], v) for k, v in model.state_dict().items())


def test_trains_through_the_engine_task(tiny_weights):
    method = _method(tiny_weights, start_progress=0.0)
    task, logged, initial = train_steps(method, steps=2)
    assert {"train/otm", "train/btm", "train/cbs", "train/reg"} <= set(logged)
    assert not initial  # no extra modules: CLIP stays outside the trained (and saved) weights
    assert not list(task.method_modules.parameters())


def test_listed_and_fails_clearly_without_clip_weights(tmp_path, capsys):
    assert "clims" in list_methods()
    assert main(["methods"]) == 0
    assert "clims" in capsys.readouterr().out
    method = create_method("clims", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), MEAN, STD)


def test_classes_must_be_known(tiny_weights):
    name, path = tiny_weights
    method = create_method("clims", clip_model=name, clip_weights=str(path))
    method.setup(_Domain(), MEAN, STD)
    batch = {"image": torch.randn(1, 3, 32, 32), "label": torch.ones(1, 2), "progress": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="classes="):  # at the first step, before the CLIMS terms start
        method.training_losses(None, None, batch, {"cams": torch.randn(1, 2, 4, 4)})
    with pytest.raises(ValueError, match="classes names 2 classes"):
        _method(tiny_weights).texts(3)
