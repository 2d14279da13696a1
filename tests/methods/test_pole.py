"""POLE: the synonym choice against a transcription of the official clip_selection.py, the losses against
the official CLIMS loop with POLE's weights, the candidates, registration, no weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clims_reference import official_clims_losses
from clip_setup import MEAN, STD, clip_method, tiny_clip
from method_training import train_steps

from wsss_domains.cli import main
from wsss_domains.clip.loading import ClipWeightsMissing, load_clip
from wsss_domains.domains import ClipPrompts, DomainPlugin
from wsss_domains.methods import create_method, list_methods

CLASSES = ["cat", "tree"]
NAMES = {"cat": ("cat", "kitty", "feline"), "tree": ("tree", "oak")}


class _Domain(DomainPlugin):
    name = "pole-test"

    def datasets(self):
        return {}

    def clip_prompts(self, label_space):
        return ClipPrompts(NAMES, background=("ground", "sky", "wall"))


@pytest.fixture
def tiny_weights(tmp_path):
    return tiny_clip(tmp_path, "wsss-tiny-pole", seed=7)


def _method(tiny_weights, **options):
    return clip_method("pole", tiny_weights, _Domain(), classes=CLASSES, **options)


def _official_choice(clip, tokenizer, image, cams, label, candidates):
    """clip_selection.py per (image, present class), on the crop at CLIP's size: the max-normalised
    ReLU CAM times the pixels, CLIP's logits against "A photo of {c}." for each candidate, softmax, arg-max."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = clip.visual.image_size[0]
    pixels = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    pixels = F.interpolate(pixels, (size, size), mode="bilinear", align_corners=True)
    clip_mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    clip_std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    chosen = []
    for i, k in torch.nonzero(label == 1).tolist():
        cam = F.interpolate(
            F.relu(cams[i : i + 1, k : k + 1]), (size, size), mode="bilinear", align_corners=False
        )
        cam = cam[0, 0] / (cam.max() + 1e-5)
        image_a = ((pixels[i] * cam - clip_mean) / clip_std).unsqueeze(0)
        temp = [f"A photo of {c}." for c in candidates[k]]
        with torch.no_grad():
            image_features, text_features, logit_scale = clip(image_a, tokenizer(temp))[:3]
        logits_per_image = logit_scale * image_features @ text_features.t()
        probs = logits_per_image.softmax(dim=-1).numpy()[0]
        chosen.append(temp[int(np.argmax(probs))])
    return chosen


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(4, 3, 40, 48, generator=gen)
    cams = torch.randn(4, 2, 5, 6, generator=gen) * 2
    label = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    return image, cams, label


def test_choice_and_losses_follow_the_official_code(tiny_weights):
    name, path = tiny_weights
    clip, tokenizer, *_ = load_clip(name, path)
    image, cams, label = _batch(3)
    candidates = [NAMES["cat"], NAMES["tree"]]
    chosen = _official_choice(clip, tokenizer, image, cams, label, candidates)
    firsts = [f"A photo of {candidates[k][0]}." for k in torch.nonzero(label == 1)[:, 1].tolist()]
    assert chosen != firsts  # some pair picks a synonym, so the choice is exercised

    background = [f"a photo of {w}." for w in ("ground", "sky", "wall")]  # CLIMS's template for these
    _, sims = official_clims_losses(clip, tokenizer, image, cams, label, chosen, background, 0.0, MEAN, STD)
    ordered = sims.flatten().sort().values
    threshold = float(ordered[ordered.numel() // 2 - 1] + ordered[ordered.numel() // 2]) / 2
    expected, sims = official_clims_losses(
        clip, tokenizer, image, cams, label, chosen, background, threshold, MEAN, STD
    )
    assert 0 < int((sims > threshold).sum()) < sims.numel()

    method = _method(tiny_weights, cbs_threshold=threshold)
    given = cams.clone().requires_grad_(True)
    batch = {"image": image, "label": label, "progress": torch.tensor(0.5)}
    losses = method.training_losses(None, torch.nn.ModuleDict(), batch, {"cams": given})
    assert method.last_choice == chosen
    weights = {"otm": 10.0, "btm": 25.0, "cbs": 1.0, "reg": 0.0}  # run_CLIMS.sh --hyper 10.0,25.0,1.0,0.0
    for key, weight in weights.items():
        assert torch.allclose(losses[key], weight * expected[key], rtol=1e-5, atol=1e-6), key

    # The choice is made without gradient; the losses' gradients reach the maps as officially.
    sum(losses.values()).backward()
    reference = cams.clone().requires_grad_(True)
    official, _ = official_clims_losses(
        clip, tokenizer, image, reference, label, chosen, background, threshold, MEAN, STD
    )
    sum(weights[k] * v for k, v in official.items()).backward()
    scale = float(reference.grad.abs().max())
    assert scale > 0 and torch.allclose(given.grad, reference.grad, rtol=1e-4, atol=1e-6 * scale)


def test_the_choice_follows_the_map(tiny_weights):
    """The same image with other maps can pick other synonyms: the choice looks at the masked image."""
    name, path = tiny_weights
    clip, tokenizer, *_ = load_clip(name, path)
    method = _method(tiny_weights)
    picks = set()
    for seed in range(6):
        image, cams, label = _batch(3)
        cams = torch.randn(cams.shape, generator=torch.Generator().manual_seed(100 + seed)) * 2
        batch = {"image": image, "label": label, "progress": torch.tensor(0.5)}
        method.training_losses(None, None, batch, {"cams": cams})
        assert method.last_choice == _official_choice(
            clip, tokenizer, image, cams, label, [NAMES["cat"], NAMES["tree"]]
        )
        picks.add(tuple(method.last_choice))
    assert len(picks) > 1


def test_candidates_from_the_domain_or_the_synonyms_option(tiny_weights):
    assert _method(tiny_weights).candidates(2) == [NAMES["cat"], NAMES["tree"]]
    method = _method(tiny_weights, synonyms={"tree": ["tree", "pine", "birch"]})
    assert method.candidates(2) == [NAMES["cat"], ("tree", "pine", "birch")]
    assert method.options["synonyms"] == {"tree": ["tree", "pine", "birch"]}
    # A class with one candidate has nothing to choose: its pairs use that name.
    method = _method(tiny_weights, synonyms={"cat": ["cat"], "tree": ["tree"]})
    image, cams, label = _batch(3)
    method.training_losses(
        None, None, {"image": image, "label": label, "progress": torch.tensor(0.5)}, {"cams": cams}
    )
    assert method.last_choice == [
        f"A photo of {CLASSES[k]}." for k in torch.nonzero(label == 1)[:, 1].tolist()
    ]
    classes, background = method.texts(2)
    assert background == ["a photo of ground.", "a photo of sky.", "a photo of wall."]


def test_bad_synonyms_fail_clearly(tiny_weights):
    with pytest.raises(ValueError, match="unknown classes \\['dog'\\]"):
        _method(tiny_weights, synonyms={"dog": ["dog"]}).candidates(2)
    name, path = tiny_weights
    for bad in ({"cat": "cat"}, {"cat": []}, ["cat"]):
        with pytest.raises(ValueError, match="synonyms must map"):
            create_method("pole", clip_model=name, clip_weights=str(path), synonyms=bad)


def test_no_loss_before_start_progress(tiny_weights):
    method = _method(tiny_weights)
    image, cams, label = _batch(3)
    batch = {"image": image, "label": label, "progress": torch.tensor(0.1)}
    assert all(float(v) == 0 for v in method.training_losses(None, None, batch, {"cams": cams}).values())
    assert method._loaded is None


def test_trains_through_the_engine_task(tiny_weights):
    method = _method(tiny_weights, start_progress=0.0)
    task, logged, initial = train_steps(method, steps=2)
    assert {"train/otm", "train/btm", "train/cbs"} <= set(logged)
    assert not initial and not list(task.method_modules.parameters())
    assert method.last_choice  # a synonym was chosen for the pairs of the last step


def test_listed_and_fails_clearly_without_clip_weights(tmp_path, capsys):
    assert "pole" in list_methods()
    assert main(["methods"]) == 0
    assert "pole" in capsys.readouterr().out
    method = create_method("pole", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), MEAN, STD)
