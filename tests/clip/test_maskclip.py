"""MaskCLIP dense features against a transcription of the ViT layer CARB uses, and the ``maskclip`` method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss_domains.clip.loading import ClipWeightsMissing, load_clip
from wsss_domains.clip.maskclip import dense_features
from wsss_domains.clip.text import ZeroShotText
from wsss_domains.clip.vit import prepare_pixels
from wsss_domains.domains import BackgroundMode, ClipPrompts, DomainPlugin, LabelSpace
from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.base import RefineContext

SPACE = LabelSpace(("road", "car", "tree"), ((1, 1, 1), (2, 2, 2), (3, 3, 3)), BackgroundMode.NONE)


class _Domain(DomainPlugin):
    name = "maskclip-test"

    def datasets(self):
        return {}

    def clip_prompts(self, label_space):
        return ClipPrompts({"road": ("road",), "car": ("car", "vehicle"), "tree": ("tree",)})


def official_value_path(block, x):
    """``mmseg/models/backbones/vit.py: TransformerEncoderLayer.forward`` with ``return_qkv=True``
    (batch-first tokens; ``self.attn.attn`` is the block's ``nn.MultiheadAttention``)."""
    y = block.ln_1(x)
    y = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)
    n, length, c = y.shape
    y = y.view(n, length, 3, c // 3).permute(2, 0, 1, 3).reshape(3 * n, length, c // 3)
    y = F.linear(y, block.attn.out_proj.weight, block.attn.out_proj.bias)
    q, k, v = y.tensor_split(3, dim=0)
    v = v + x
    return v + block.mlp(block.ln_2(v))  # ffn(norm2(v), identity=v)


def test_dense_features_follow_the_value_path_of_the_last_block(tiny):
    model, _ = tiny
    visual = model.visual
    pixels = torch.randn(2, 3, 32, 32)
    seen = []
    blocks = visual.transformer.resblocks
    hook = blocks[-2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            visual(pixels)  # the trained input size: open_clip's own forward up to the last block
    finally:
        hook.remove()
    v = official_value_path(blocks[-1], seen[0])
    v = visual.ln_post(v)[:, 1:] @ visual.proj  # final_norm, then CARB's proj (1x1 conv) of v
    want = F.normalize(v, dim=-1).transpose(1, 2).reshape(2, -1, 4, 4)
    got, grid = dense_features(visual, pixels)
    assert grid == (4, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Not the ordinary last block: the query-key mixing is skipped.
    assert not torch.allclose(got, F.normalize(visual.ln_post(blocks[-1](seen[0]))[:, 1:] @ visual.proj, dim=-1)
                              .transpose(1, 2).reshape(2, -1, 4, 4), atol=1e-3)  # fmt: skip


def test_maskclip_labels_are_the_official_arg_max_over_the_present_classes(tiny_checkpoint, no_network):
    name, path, _ = tiny_checkpoint
    method = create_method("maskclip", clip_model=name, clip_weights=str(path))
    domain = _Domain()
    method.setup(domain, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    image = torch.rand(3, 40, 48)
    cams = torch.rand(3, 40, 48)
    present = torch.tensor([1.0, 0.0, 1.0])
    out = method.refine(cams, RefineContext.of(image, present, domain, SPACE))
    assert torch.equal(out[1], cams[1])  # absent class untouched
    # gen_clip_mask: cosine with each class's text times the image labels, resized, arg-max.
    model, tokenizer, *_ = load_clip(name, path)
    text = F.normalize(
        ZeroShotText(model, tokenizer, domain.clip_prompts(SPACE)).foreground(["road", "car", "tree"]), dim=-1
    )
    features, _ = dense_features(model.visual, prepare_pixels(model, image, (40, 48)))
    cosine = torch.einsum("bchw,lc->blhw", features, text) * present[None, :, None, None]
    cosine = F.interpolate(cosine, size=(40, 48), mode="bilinear", align_corners=False)
    official = cosine[0].argmax(0)
    ours = torch.tensor([0, 2])[out[[0, 2]].argmax(0)]
    # Where every present cosine is negative (random weights), the official product picks an absent
    # class (its 0 wins); elsewhere the labels agree.
    positive = cosine[0, [0, 2]].amax(0) > 0
    assert positive.float().mean() > 0.2 and bool((official[~positive] == 1).all())
    assert torch.equal(ours[positive], official[positive])
    torch.testing.assert_close(
        out[[0, 2]].sum(0), torch.ones(40, 48)
    )  # no background words: a softmax over two


def test_one_present_class_without_background_words_takes_every_pixel(tiny_checkpoint, no_network):
    name, path, _ = tiny_checkpoint
    method = create_method("maskclip", clip_model=name, clip_weights=str(path))
    method.setup(_Domain(), (0.5,) * 3, (0.5,) * 3)
    out = method.refine(torch.zeros(3, 16, 24), RefineContext.of(torch.rand(3, 16, 24), torch.tensor([0.0, 1.0, 0.0]),
                                                                  _Domain(), SPACE))  # fmt: skip
    assert torch.equal(out[1], torch.ones(16, 24)) and not out[[0, 2]].any()


def test_listed_and_fails_clearly_without_weights(tmp_path):
    assert "maskclip" in list_methods()
    method = create_method("maskclip", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), (0.5,) * 3, (0.5,) * 3)
