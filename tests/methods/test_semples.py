"""SemPLeS: its three stages' losses against the official code's formulas (transcribed here, with the
official ``encode_btp``), which parts each stage moves, training through the engine, registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clims_reference import clip_pixels
from clip_setup import MEAN, STD, clip_method, tiny_clip
from method_training import FAST_BACKBONE, changed, cli_train_and_pseudo_label, train_steps

from wsss_domains.clip.loading import ClipWeightsMissing, load_clip
from wsss_domains.domains import ClipPrompts, DomainPlugin
from wsss_domains.methods import create_method, list_methods
from wsss_domains.models.classifier import CamClassifier

CLASSES = ["cat", "tree"]
LENGTH = 4


class _Domain(DomainPlugin):
    name = "semples-test"

    def datasets(self):
        return {}

    def clip_prompts(self, label_space):
        return ClipPrompts({"cat": ("kitty", "cat"), "tree": ("tree",)}, background=("sky",))


@pytest.fixture
def tiny_weights(tmp_path):
    return tiny_clip(tmp_path, "wsss-tiny-semples", seed=11)  # similarities inside the clamp


def _method(tiny_weights, **options):
    return clip_method(
        "semples", tiny_weights, _Domain(), **{"classes": CLASSES, "prompt_length": LENGTH, **options}
    )


# -- the official code, transcribed --------------------------------------------------------------
def _official_encode_btp(clip, tokenizer, btp):
    """``CLIP-main/clip/model.py: encode_btp`` on an open_clip model (batch-first transformer)."""
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    prefix = tokenizer.encode("a photo of ")
    dot = tokenizer.encode(".")[0]
    n = btp.shape[0]

    def emb(ids):
        return clip.token_embedding(torch.tensor([ids])).expand(n, -1, -1)

    context = clip.positional_embedding.shape[0]
    x = torch.cat(
        [emb([sot]), emb(prefix), btp, emb([dot]), emb([eot]), emb([0] * (context - 6 - btp.shape[1]))], dim=1
    )
    x = x + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[:, 5 + btp.shape[1], :] @ clip.text_projection


def _official_inputs(clip, image, cams, label, eps):
    """``engine1/2/3.py``: CAMs to 224 (here CLIP's size), min-max with ``eps``, fg and bg inputs."""
    n, k = label.shape
    size = clip.visual.image_size[0]
    samples = F.interpolate(clip_pixels(image, MEAN, STD), (size, size), mode="bilinear", align_corners=True)
    cam_224 = F.interpolate(cams, (size, size), mode="bilinear", align_corners=True).reshape(
        n * k, 1, size, size
    )
    min_ = cam_224.min(dim=2, keepdim=True)[0].min(dim=3, keepdim=True)[0]
    max_ = cam_224.max(dim=2, keepdim=True)[0].max(dim=3, keepdim=True)[0]
    cam_224 = (cam_224 - min_) / (max_ - min_ + eps)
    fg_indices = torch.nonzero(label.reshape(-1) == 1, as_tuple=False).squeeze()
    temp_idx = torch.nonzero(label == 1, as_tuple=False)
    fg, bg = [], []
    for j in range(temp_idx.shape[0]):
        fg.append(cam_224[fg_indices[j]] * samples[temp_idx[j, 0]])
        bg.append((1 - cam_224[fg_indices[j]]) * samples[temp_idx[j, 0]])
    return torch.stack(fg), torch.stack(bg), temp_idx[:, 1]


def _normalised(x):
    return x / x.norm(dim=-1, keepdim=True)


def _official(clip, tokenizer, image, cams, label, btp, stage):
    """The unweighted official losses of ``stage`` 'b' (engine2) or 'c' (engine3); both hold engine1's."""
    texts = ["a photo of kitty.", "a photo of tree."]
    fg, bg, classes = _official_inputs(clip, image, cams, label, 1e-1)
    pair_text = _normalised(clip.encode_text(tokenizer([texts[int(c)] for c in classes])))
    fg_f, bg_f = _normalised(clip.encode_image(fg)), _normalised(clip.encode_image(bg))
    out = {
        "otm": -torch.log((fg_f * pair_text).sum(-1).clamp(0.0001, 0.9999)).mean(),
        "btm": -torch.log(1 - (bg_f * pair_text).sum(-1).clamp(0.0001, 0.9999)).mean(),
    }
    btp_features = _normalised(_official_encode_btp(clip, tokenizer, btp))[classes]
    if stage == "b":
        _, bg_b, _ = _official_inputs(clip, image, cams.detach(), label, 1e-4)
        img_similarity = (_normalised(clip.encode_image(bg_b)) * btp_features).sum(-1)
        label_similarity = (pair_text * btp_features).sum(-1).clamp(0.0001, 0.9999)
        out["prompt_image"] = -torch.log(img_similarity.clamp(0.0001, 0.9999)).mean()
        out["prompt_text"] = torch.log(label_similarity).mean()
    else:
        img_similarity = (fg_f * btp_features).sum(-1)
        out["refine"] = -torch.log(1 - img_similarity.clamp(0.0001, 0.9999)).mean()
    return out


WEIGHTS = {"otm": 1.0, "btm": 2.4, "prompt_image": 1.0, "prompt_text": 0.02, "refine": 0.05}


@pytest.mark.parametrize("stage,progress", [("b", 0.4), ("c", 0.8)])
def test_losses_follow_the_official_formulas(tiny_weights, stage, progress):
    name, path = tiny_weights
    clip, tokenizer, *_ = load_clip(name, path)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(3, 3, 40, 48, generator=gen)
    cams = torch.randn(3, 2, 5, 6, generator=gen) * 2
    label = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    method = _method(tiny_weights)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    modules = method.build_modules(model)
    btp = modules["prompts"].prompts
    assert btp.shape == (2, LENGTH, clip.token_embedding.embedding_dim)

    given = cams.clone().requires_grad_(True)
    batch = {"image": image, "label": label, "progress": torch.tensor(progress)}
    losses = method.training_losses(model, modules, batch, {"cams": given})
    reference_cams = cams.clone().requires_grad_(True)
    reference_btp = btp.detach().clone().requires_grad_(True)
    expected = _official(clip, tokenizer, image, reference_cams, label, reference_btp, stage)
    for key, value in losses.items():
        want = WEIGHTS[key] * expected[key] if key in expected else torch.tensor(0.0)
        assert torch.allclose(value, want, rtol=1e-5, atol=1e-6), (key, value, want)
    assert all(float(expected[k].detach()) != 0 for k in expected)

    # Gradients: the same on the CAMs; the prompts learn in (b) only, and never from the CAM terms.
    sum(losses.values()).backward()
    sum(WEIGHTS[k] * v for k, v in expected.items() if k != "refine" or stage == "c").backward()
    scale = float(reference_cams.grad.abs().max())
    assert scale > 0 and torch.allclose(given.grad, reference_cams.grad, rtol=1e-4, atol=1e-5 * scale)
    if stage == "b":
        assert btp.grad is not None and float(btp.grad.abs().max()) > 0
        assert torch.allclose(btp.grad, reference_btp.grad, rtol=1e-4, atol=1e-7)
    else:
        assert btp.grad is None


def test_prompt_losses_do_not_reach_the_cams(tiny_weights):
    method = _method(tiny_weights)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    modules = method.build_modules(model)
    cams = torch.randn(2, 2, 4, 4, requires_grad=True)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.ones(2, 2), "progress": torch.tensor(0.5)}
    losses = method.training_losses(model, modules, batch, {"cams": cams})
    (losses["prompt_image"] + losses["prompt_text"]).backward()
    assert cams.grad is None


def test_nothing_before_start_progress_and_clip_not_loaded(tiny_weights):
    method = _method(tiny_weights)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    modules = method.build_modules(model)
    cams = torch.randn(2, 2, 4, 4, requires_grad=True)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.ones(2, 2), "progress": torch.tensor(0.1)}
    losses = method.training_losses(model, modules, batch, {"cams": cams})
    assert set(losses) == {"otm", "btm", "prompt_image", "prompt_text", "refine"}
    assert all(float(v.detach()) == 0 for v in losses.values())
    assert method._loaded is None


def test_prompt_learning_lowers_its_loss_and_moves_only_the_prompts(tiny_weights):
    torch.manual_seed(0)
    method = _method(tiny_weights)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    modules = method.build_modules(model)
    gen = torch.Generator().manual_seed(4)
    batch = {
        "image": torch.randn(2, 3, 32, 32, generator=gen),
        "label": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        "progress": torch.tensor(0.4),
    }
    model.eval()  # batch-norm statistics stay put; gradients still flow
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts_before = modules["prompts"].prompts.detach().clone()
    # One optimiser over everything (main2.py's rate and decay): only what the loss reaches may move.
    optimiser = torch.optim.AdamW([*model.parameters(), *modules.parameters()], lr=0.025, weight_decay=0.03)
    totals = []
    for _ in range(8):
        outputs = model(batch["image"])
        losses = method.training_losses(model, modules, batch, {"cams": outputs["cams"]})
        loss = losses["prompt_image"] + losses["prompt_text"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        totals.append(float(loss.detach()))
    assert totals[-1] < totals[0], totals
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(prompts_before, modules["prompts"].prompts)
    assert not any(p.requires_grad for p in method._loaded.model.parameters())


def test_trains_through_the_engine_task_with_the_prompt_learning_rate(tiny_weights):
    method = _method(tiny_weights, start_progress=0.0, prompt_lr_scale=10.0)
    task, logged, initial = train_steps(method, steps=2)  # progress 0 and 0.5: stage (b)
    assert {"train/otm", "train/btm", "train/prompt_image", "train/prompt_text"} <= set(logged)
    assert changed(task, initial, "prompts")
    groups = task.configure_optimizers().param_groups
    prompt_group = [
        g for g in groups if any(p is task.method_modules["prompts"].prompts for p in g["params"])
    ]
    assert len(prompt_group) == 1 and prompt_group[0]["base_lr"] == pytest.approx(10.0 * task.lr)
    assert len(prompt_group[0]["params"]) == 1


def test_refinement_stage_leaves_the_prompts_as_they_are(tiny_weights):
    method = _method(tiny_weights, start_progress=0.0, refine_progress=0.0)
    task, logged, initial = train_steps(method, steps=2)
    assert "train/refine" in logged and logged["train/refine"] > 0
    assert not changed(task, initial, "prompts")


def test_train_and_pseudo_label_end_to_end(tiny_weights, capsys, tmp_path):
    name, path = tiny_weights
    options = [f"clip_model={name}", f"clip_weights={path}", f"prompt_length={LENGTH}", "start_progress=0"]
    _, out = cli_train_and_pseudo_label(
        capsys, tmp_path, "semples", *[a for o in options for a in ("--method-option", o)], steps=3
    )
    assert "pseudo-labels: 3 written" in out
    assert len(list((tmp_path / "pl").glob("*.png"))) == 3


def test_listed_and_fails_clearly(tiny_weights, tmp_path):
    assert "semples" in list_methods()
    method = create_method("semples", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), MEAN, STD)
    name, path = tiny_weights
    too_long = create_method("semples", clip_model=name, clip_weights=str(path), prompt_length=30)
    with pytest.raises(ValueError, match="lower prompt_length"):  # the tiny tower reads 32 tokens
        too_long.setup(_Domain(), MEAN, STD)
    with pytest.raises(ValueError, match="refine_progress"):
        create_method("semples", start_progress=0.5, refine_progress=0.3)
    with pytest.raises(Exception, match="cbs_weight"):
        create_method("semples", cbs_weight=1.0)
