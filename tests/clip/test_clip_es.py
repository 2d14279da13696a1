"""CLIP-ES CAMs: the batched backward equals an explicit per-class computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss_domains.clip.clip_es import clip_es_cams, gradcam_maps, gradcam_maps_independent
from wsss_domains.clip.text import ZeroShotText
from wsss_domains.clip.vit import embed, image_embedding, prepare_pixels, run_prefix

NAMES = ["red thing", "green thing", "blue thing"]


def _text(model, tokenizer, prompts, names):
    source = ZeroShotText(model, tokenizer, prompts)
    return torch.cat([source.foreground(names), source.background()])


def _reference_gradcam(model, pixels, text, k):
    """Per class, with open_clip's own block forward and a fresh autograd graph (official recipe)."""
    visual = model.visual
    x = visual._embeds(pixels)
    with torch.no_grad():
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    last = visual.transformer.resblocks[-1]
    act = last.ln_1(x).detach().requires_grad_(True)
    y = x + last.ls_1(last.attn(act, act, act, need_weights=False)[0])
    y = y + last.ls_2(last.mlp(last.ln_2(y)))
    image = F.normalize(visual.ln_post(y)[:, 1:].mean(dim=1) @ visual.proj, dim=-1)
    prob = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)[0, k]
    (grad,) = torch.autograd.grad(prob, act)
    weights = grad[0, 1:].mean(dim=0)
    cam = torch.relu(act[0, 1:].detach() @ weights)
    for _ in range(2):  # normalised per layer, then after layer aggregation
        cam = cam - cam.min()
        cam = cam / (1e-7 + cam.max())
    return cam.view(visual.grid_size)


def test_batched_gradcam_equals_per_class_autograd(tiny, tiny_prompts):
    model, tokenizer = tiny
    image = torch.rand(3, 32, 32)
    text = _text(model, tokenizer, tiny_prompts, NAMES)
    pixels = prepare_pixels(model, image, (32, 32))
    prefix = run_prefix(model.visual, pixels, attn_layers=8)
    batched, _ = gradcam_maps(model.visual, prefix, text, model.logit_scale.exp().detach(), len(NAMES))
    reference = torch.stack([_reference_gradcam(model, pixels, text, k) for k in range(len(NAMES))])
    assert batched.shape == (3, 4, 4)
    assert reference.amax(dim=(1, 2)).min() > 0.99  # non-degenerate maps
    assert (batched - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_batched_gradcam_equals_independent_full_forward_per_class(tiny, tiny_prompts, size):
    """Per class, the whole tower forward from the pixels and its own autograd.grad (nothing shared)."""
    model, tokenizer = tiny
    visual = model.visual
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    text = _text(model, tokenizer, tiny_prompts, NAMES)
    pixels = prepare_pixels(model, image, size)
    scale = model.logit_scale.exp().detach()
    batched, _ = gradcam_maps(visual, run_prefix(visual, pixels, attn_layers=8), text, scale, len(NAMES))
    independent = gradcam_maps_independent(visual, pixels, text, scale, len(NAMES))
    assert independent.shape == batched.shape == (3, size[0] // 8, size[1] // 8)
    assert not visual.transformer.resblocks[-1].ln_1._forward_hooks  # the capture hook is removed
    assert independent.amax(dim=(1, 2)).min() > 0.99  # non-degenerate maps
    # The maps differ between classes, so a batched path that mixed classes up would not match.
    assert (independent - independent.roll(1, dims=0)).abs().amax(dim=(1, 2)).min() > 1e-2
    assert (batched - independent).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(32, 32), (45, 61)])
def test_full_cams_batched_equal_per_class(tiny, tiny_prompts, size):
    model, tokenizer = tiny
    names = ["green thing", "red thing", "blue thing"]
    image = torch.rand(3, *size)
    for refine in (False, True):
        batched = clip_es_cams(model, tokenizer, image, names, tiny_prompts, refine=refine)
        looped = clip_es_cams(model, tokenizer, image, names, tiny_prompts, refine=refine, batched=False)
        assert batched.shape == (3, *size)
        assert batched.min() >= 0 and batched.max() <= 1
        assert (batched - looped).abs().max() <= 1e-5


def test_cams_follow_class_order_and_size(tiny, tiny_prompts):
    model, tokenizer = tiny
    image = torch.rand(3, 40, 24)
    both = clip_es_cams(model, tokenizer, image, ["red thing", "blue thing"], tiny_prompts)
    swapped = clip_es_cams(model, tokenizer, image, ["blue thing", "red thing"], tiny_prompts)
    assert both.shape == (2, 40, 24)
    assert torch.allclose(both, swapped.flip(0), atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    assert clip_es_cams(model, tokenizer, image, [], tiny_prompts).shape == (0, 40, 24)


def test_unknown_class_and_lone_class_without_background(tiny, tiny_prompts):
    model, tokenizer = tiny
    image = torch.rand(3, 32, 32)
    with pytest.raises(KeyError, match="no CLIP prompt"):
        clip_es_cams(model, tokenizer, image, ["zebra"], tiny_prompts)
    bare = type(tiny_prompts)(class_names=tiny_prompts.class_names, templates=tiny_prompts.templates)
    with pytest.raises(ValueError, match="background vocabulary"):
        clip_es_cams(model, tokenizer, image, ["red thing"], bare)


def test_embedding_matches_open_clip_at_native_size(tiny):
    model, _ = tiny
    pixels = prepare_pixels(model, torch.rand(3, 32, 32), (32, 32))
    tokens, grid = embed(model.visual, pixels)
    assert grid == (4, 4)
    assert torch.allclose(tokens, model.visual._embeds(pixels), atol=1e-6)
    with torch.no_grad():
        x = model.visual.transformer(model.visual._embeds(pixels))
        expected = model.visual.ln_post(x)[:, 1:].mean(dim=1) @ model.visual.proj
        assert torch.allclose(image_embedding(model.visual, pixels), expected, atol=1e-5)


def test_interpolated_grid_follows_image_size(tiny):
    model, _ = tiny
    pixels = prepare_pixels(model, torch.rand(3, 45, 61), (48, 64))
    prefix = run_prefix(model.visual, pixels, attn_layers=2)
    assert prefix.grid == (6, 8)
    assert prefix.tokens.shape[1] == 1 + 48
    assert prefix.attn_count == 1  # the last block supplies the second kept map
    assert torch.allclose(prefix.attn_sum.sum(dim=-1), torch.ones(1, 49), atol=1e-5)


class _ClipEsScores(torch.nn.Module):
    """The official CLIP-ES forward as pytorch-grad-cam sees it: pixels -> softmax over the text rows."""

    def __init__(self, model: torch.nn.Module, text: torch.Tensor) -> None:
        super().__init__()
        self.model, self.text = model, text

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        # The fixture's weights are frozen; a graph is needed, as the official model's trainable weights give.
        x = visual._embeds(pixels.detach().requires_grad_(True))
        for block in visual.transformer.resblocks:
            x = block(x)
        image = F.normalize(visual.ln_post(x)[:, 1:].mean(dim=1) @ visual.proj, dim=-1)
        return (self.model.logit_scale.exp() * image @ self.text.T).softmax(dim=-1)


def test_batched_gradcam_equals_pytorch_grad_cam_as_the_official_code_calls_it(tiny, tiny_prompts):
    """CLIP-ES's official code computes its maps with pytorch-grad-cam's GradCAM on the last block's
    ``ln_1`` (patch tokens reshaped to a grid, the class token dropped); the batched path must agree."""
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, tokenizer = tiny
    visual = model.visual
    text = _text(model, tokenizer, tiny_prompts, NAMES)
    pixels = prepare_pixels(
        model, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)), (32, 32)
    )
    h, w = visual.grid_size

    class GridGradCAM(grad_cam.GradCAM):
        def get_target_width_height(self, input_tensor):  # maps at the patch grid, as CLIP-ES uses them
            return w, h

    def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:  # the official reshape_transform
        return tokens[:, 1:].reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    scores = _ClipEsScores(model, text)
    last_ln_1 = visual.transformer.resblocks[-1].ln_1
    with GridGradCAM(model=scores, target_layers=[last_ln_1], reshape_transform=tokens_to_grid) as cam:
        official = torch.stack(
            [torch.from_numpy(cam(pixels, targets=[ClassifierOutputTarget(k)])[0]) for k in range(len(NAMES))]
        )
    prefix = run_prefix(visual, pixels, attn_layers=8)
    batched, _ = gradcam_maps(visual, prefix, text, model.logit_scale.exp().detach(), len(NAMES))
    assert official.shape == batched.shape == (3, h, w)
    assert official.amax(dim=(1, 2)).min() > 0.99 and (official - official.roll(1, dims=0)).abs().max() > 1e-2
    assert (batched - official).abs().max() <= 1e-5
