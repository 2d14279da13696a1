"""WeCLIP against transcriptions of zbf1991/WeCLIP (decoder, losses, affinity labels, the decoder-guided
attention, the learning-rate schedule), the frozen pass against open_clip, fitting and pseudo-labelling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_setup import tiny_clip
from probe_setup import TWO, WITH_BACKGROUND, Plain, fakes, ready, tiny_model

from wsss_domains.cli import main
from wsss_domains.clip.caa import box_mask
from wsss_domains.clip.clip_es import gradcam_maps
from wsss_domains.clip.loading import ClipWeightsMissing, load_clip
from wsss_domains.clip.tiny import tiny_model_config
from wsss_domains.clip.vit import PrefixPass, prepare_pixels
from wsss_domains.domains import ClipPrompts
from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.fitting import FitContext, extractor_settings
from wsss_domains.methods.weclip import (
    WeClipDecoder,
    affinity_loss,
    affinity_targets,
    balanced_seg_loss,
    decoder_attention,
    frozen_pass,
    hard_labels,
    poly_warmup_factor,
    weclip_maps,
)

IGNORE = 255


class _Domain(Plain):
    name = "weclip-test"

    def clip_prompts(self, label_space):
        return ClipPrompts({c: (c,) for c in label_space.foreground_names}, background=("ground", "sky"))


@pytest.fixture
def tiny_weights(tmp_path):
    config = tiny_model_config(image_size=32, patch_size=8, layers=3)
    return tiny_clip(tmp_path, "wsss-tiny-weclip", seed=5, config=config)


# -- the official code, transcribed ---------------------------------------------------------------
def official_mask_by_radius(h, w, radius):
    """``dist_clip_voc.py: get_mask_by_radius``."""
    hw = h * w
    mask = np.zeros((hw, hw))
    for i in range(hw):
        _h, _w = i // w, i % w
        _h0, _h1 = max(0, _h - radius), min(h, _h + radius + 1)
        _w0, _w1 = max(0, _w - radius), min(w, _w + radius + 1)
        for i1 in range(_h0, _h1):
            for i2 in range(_w0, _w1):
                _i2 = i1 * w + i2
                mask[i, _i2] = 1
                mask[_i2, i] = 1
    return mask


def official_affinity_label(cam_label, mask, ignore_index=IGNORE):
    """``utils/camutils.py: cams_to_affinity_label`` (labels at 16x the patch grid)."""
    b, h, w = cam_label.shape
    resized = F.interpolate(cam_label.unsqueeze(1).float(), size=[h // 16, w // 16], mode="nearest")
    _cam_label = resized.reshape(b, 1, -1)
    rep = _cam_label.repeat([1, _cam_label.shape[-1], 1])
    rep_t = rep.permute(0, 2, 1)
    aff_label = (rep == rep_t).long()
    for i in range(b):
        aff_label[i, mask == 0] = ignore_index
        aff_label[i, :, rep[i, 0, :] == ignore_index] = ignore_index
        aff_label[i, rep[i, 0, :] == ignore_index, :] = ignore_index
    return aff_label


def official_aff_loss(inputs, targets):
    """``utils/losses.py: get_aff_loss``."""
    pos_label = (targets == 1).type(torch.int16)
    pos_count = pos_label.sum() + 1
    neg_label = (targets == 0).type(torch.int16)
    neg_count = neg_label.sum() + 1
    return (
        0.5 * torch.sum(pos_label * (1 - inputs)) / pos_count
        + 0.5 * torch.sum(neg_label * inputs) / neg_count
    )


def official_seg_loss(pred, label, ignore_index=IGNORE):
    """``dist_clip_voc.py: get_seg_loss``."""
    bg_label = label.clone()
    bg_label[label != 0] = ignore_index
    bg_loss = F.cross_entropy(pred, bg_label.long(), ignore_index=ignore_index)
    fg_label = label.clone()
    fg_label[label == 0] = ignore_index
    fg_loss = F.cross_entropy(pred, fg_label.long(), ignore_index=ignore_index)
    return (bg_loss + fg_loss) * 0.5


def official_seg_trans_attention(attn_weight_list, attn_weight_last, seg_attn):
    """``clip/clip_tool.py: perform_single_voc_cam``, the ``require_seg_trans`` branch."""
    attn_weight = torch.cat([attn_weight_list, attn_weight_last], dim=0)
    attn_weight = attn_weight[:, 1:, 1:][-6:]
    attn_diff = seg_attn - attn_weight
    attn_diff = torch.sum(attn_diff.flatten(1), dim=1)
    diff_th = torch.mean(attn_diff)
    attn_mask = torch.zeros_like(attn_diff)
    attn_mask[attn_diff <= diff_th] = 1
    attn_mask = attn_mask.reshape(-1, 1, 1).expand_as(attn_weight)
    attn_weight = torch.sum(attn_mask * attn_weight, dim=0) / (torch.sum(attn_mask, dim=0) + 1e-5)
    return attn_weight * seg_attn.squeeze(0)


def official_trans_mat(attn_weight):
    """``clip/clip_tool.py: compute_trans_mat``."""
    trans_mat = attn_weight / torch.sum(attn_weight, dim=0, keepdim=True)
    trans_mat = trans_mat / torch.sum(trans_mat, dim=1, keepdim=True)
    for _ in range(2):
        trans_mat = trans_mat / torch.sum(trans_mat, dim=0, keepdim=True)
        trans_mat = trans_mat / torch.sum(trans_mat, dim=1, keepdim=True)
    trans_mat = (trans_mat + trans_mat.transpose(1, 0)) / 2
    return torch.matmul(trans_mat, trans_mat)


def official_lr_factors(steps, warmup=50, ratio=1e-6, max_iter=None):
    """``utils/optimizer.py: PolyWarmupAdamW.step``'s multiplier per step (power 1)."""
    max_iter = max_iter or steps
    out, last = [], None
    for global_step in range(steps):
        if global_step < warmup:
            last = 1 - (1 - global_step / warmup) * (1 - ratio)
        elif global_step < max_iter:
            last = (1 - global_step / max_iter) ** 1.0
        out.append(last)
    return out


def official_decoder(decoder, tokens, grid):
    """``SegFormerHead`` + ``DecoderTransformer`` of the official code, in its (L, N, E) layout,
    with the weights of ``decoder`` (eval mode: no dropout)."""
    b = tokens[0].shape[0]
    x_list = []
    for mlp, t in zip(decoder.mlps, tokens, strict=True):
        x = t.transpose(1, 2).reshape(b, -1, *grid)  # the official input: B x C x h x w
        x = x.flatten(2).transpose(1, 2)
        x = F.relu(x @ mlp.proj.weight.T + mlp.proj.bias) @ mlp.proj_2.weight.T + mlp.proj_2.bias
        x_list.append(x.permute(0, 2, 1).reshape(b, -1, *grid))
    x = torch.cat(x_list, dim=1)
    fts = F.conv2d(x, decoder.fuse.weight, decoder.fuse.bias)
    f = fts.reshape(b, fts.shape[1], -1)
    attn_pred = torch.sigmoid(f.transpose(2, 1).bmm(f))
    x = f.permute(2, 0, 1)  # L, N, D
    for block in decoder.blocks:
        a = F.layer_norm(x, (x.shape[-1],), block.ln_1.weight, block.ln_1.bias)
        out, _ = F.multi_head_attention_forward(
            a, a, a, x.shape[-1], block.attn.num_heads, block.attn.in_proj_weight, block.attn.in_proj_bias,
            None, None, False, 0.0, block.attn.out_proj.weight, block.attn.out_proj.bias, training=False,
        )  # fmt: skip
        x = x + out
        m = F.layer_norm(x, (x.shape[-1],), block.ln_2.weight, block.ln_2.bias)
        h = m @ block.mlp[0].weight.T + block.mlp[0].bias
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ block.mlp[2].weight.T + block.mlp[2].bias
    x = x.permute(1, 2, 0).reshape(b, -1, *grid)
    return F.conv2d(x, decoder.classifier.weight, decoder.classifier.bias), attn_pred


# -- formulas -------------------------------------------------------------------------------------
def test_decoder_follows_the_official_head_and_transformer():
    torch.manual_seed(0)
    decoder = WeClipDecoder(in_dim=12, blocks=3, outputs=4, dim=16, layers=2, heads=2).eval()
    grid = (3, 5)
    tokens = [torch.randn(2, 15, 12) for _ in range(3)]
    logits, affinity = decoder(tokens, grid)
    want_logits, want_affinity = official_decoder(decoder, tokens, grid)
    assert logits.shape == (2, 4, 3, 5) and affinity.shape == (2, 15, 15)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(affinity, want_affinity, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="fuses 3 blocks"):
        decoder(tokens[:2], grid)


def test_affinity_labels_and_loss_follow_the_official_code():
    torch.manual_seed(1)
    labels = torch.randint(0, 3, (2, 64, 80))
    labels[0, :20, :30] = IGNORE
    labels[1, 40:, 50:] = IGNORE
    grid, radius = (4, 5), 2
    mask = torch.from_numpy(official_mask_by_radius(*grid, radius))
    want = official_affinity_label(labels, mask)
    got = affinity_targets(labels, grid, radius)
    assert torch.equal(got, want)
    assert (got == 0).any() and (got == 1).any() and (got == IGNORE).any()
    affinity = torch.rand(2, 20, 20)
    torch.testing.assert_close(affinity_loss(affinity, got), official_aff_loss(affinity, want).float())


def test_seg_loss_halves_background_and_foreground_as_the_official_code():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6, 7)
    labels = torch.randint(0, 3, (2, 6, 7))
    labels[0, 0] = IGNORE
    torch.testing.assert_close(
        balanced_seg_loss(logits, labels, background=True), official_seg_loss(logits, labels)
    )
    # Without a background channel: plain cross-entropy over the classes.
    plain = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    torch.testing.assert_close(balanced_seg_loss(logits, labels, background=False), plain)
    # A crop without foreground: the official mean over no pixel is NaN; the background half remains.
    only_bg = torch.zeros(1, 6, 7, dtype=torch.long)
    half = 0.5 * F.cross_entropy(logits[:1], only_bg)
    torch.testing.assert_close(balanced_seg_loss(logits[:1], only_bg, background=True), half)


def test_decoder_guided_attention_follows_the_official_branch():
    torch.manual_seed(3)
    n = 9
    attn = torch.rand(12, n + 1, n + 1).softmax(-1)
    seg = torch.rand(n, n)
    want = official_seg_trans_attention(attn[:11], attn[11:], seg[None])
    got = decoder_attention(attn[:, 1:, 1:], seg)
    torch.testing.assert_close(got, want)
    # The rule keeps only some blocks: the mean of the kept ones differs from the plain mean.
    assert not torch.allclose(got, attn[-6:, 1:, 1:].mean(0) * seg)
    # Equal blocks all sit exactly at the mean and are all kept (the official ``<=``).
    same = torch.full((12, n + 1, n + 1), 0.25)
    half = torch.full((n, n), 0.5)
    want = official_seg_trans_attention(same[:11], same[11:], half[None])
    torch.testing.assert_close(decoder_attention(same[:, 1:, 1:], half), want)
    assert torch.allclose(want, torch.full((n, n), 0.125), atol=1e-5)


def test_learning_rate_schedule_follows_the_official_optimiser():
    for steps in (40, 120):
        want = official_lr_factors(steps)
        got = [poly_warmup_factor(s, steps) for s in range(steps)]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_frozen_pass_keeps_the_outputs_of_every_block_but_the_last(tiny_weights):
    name, path = tiny_weights
    loaded = load_clip(name, str(path), device="cpu")
    visual = loaded.model.visual
    pixels = torch.randn(1, 3, 32, 32)
    seen = []
    hooks = [
        b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in visual.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            visual(pixels)
    finally:
        for h in hooks:
            h.remove()
    frozen = frozen_pass(visual, pixels)
    assert len(frozen.outputs) == len(visual.transformer.resblocks) - 1 == 2
    for got, want in zip(frozen.outputs, seen[:-1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert frozen.grid == (4, 4) and frozen.attentions[0].shape == (1, 17, 17)
    torch.testing.assert_close(frozen.attentions[0].sum(-1), torch.ones(1, 17))


def test_refined_maps_use_the_decoder_affinity_as_the_official_code(tiny_weights):
    name, path = tiny_weights
    loaded = load_clip(name, str(path), device="cpu")
    model, visual = loaded.model, loaded.model.visual
    torch.manual_seed(4)
    image = torch.rand(3, 32, 48)
    frozen = frozen_pass(visual, prepare_pixels(model, image, (32, 48)))
    text = F.normalize(torch.randn(4, 32), dim=-1)
    scale = model.logit_scale.exp().float()
    n = frozen.grid[0] * frozen.grid[1]
    seg = torch.rand(n, n)
    got = weclip_maps(
        visual, frozen.outputs[-1], [a[0] for a in frozen.attentions], frozen.grid, text, scale, 2, seg
    )
    # Expected: the official pipeline on the same GradCAM maps (the tested CLIP-ES GradCAM and boxes).
    prefix = PrefixPass(frozen.outputs[-1], None, 0, frozen.grid)
    cams, last = gradcam_maps(visual, prefix, text, scale, 2)
    trans = official_trans_mat(
        official_seg_trans_attention(torch.stack(frozen.attentions)[:, 0], last[None], seg)
    )
    want = []
    for cam in cams:
        masked = trans * box_mask(cam, 0.4).view(1, -1).float()
        refined = (masked @ cam.reshape(-1, 1)).reshape(frozen.grid)
        refined = refined - refined.min()
        want.append(refined / (1e-7 + refined.max()))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    # Without the decoder: the mean attention of the last 8 blocks (CLIP-ES's own affinity), here of
    # eleven earlier blocks' attentions (made up: the tiny tower has two) and the last block's.
    made_up = [(4 * torch.randn(n + 1, n + 1)).softmax(-1) for _ in range(11)]
    early = weclip_maps(visual, frozen.outputs[-1], made_up, frozen.grid, text, scale, 2, None)
    trans = official_trans_mat(torch.cat([torch.stack(made_up), last[None]])[:, 1:, 1:][-8:].mean(0))
    want = []
    for cam in cams:
        refined = ((trans * box_mask(cam, 0.4).view(1, -1).float()) @ cam.reshape(-1, 1)).reshape(frozen.grid)
        refined = refined - refined.min()
        want.append(refined / (1e-7 + refined.max()))
    torch.testing.assert_close(early, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_hard_labels_map_channels_to_classes_background_and_exclusions():
    maps = torch.zeros(1, 4, 4)
    maps[0, :, 2:] = 1.0  # class b (id 1 of TWO's foreground; the only present class)
    image = torch.zeros(3, 8, 8)
    image[:, :, 4:] = 1.0
    present = torch.tensor([0.0, 1.0])
    exclude = torch.zeros(8, 8, dtype=torch.bool)
    exclude[0, 0] = True
    labels = hard_labels(maps, present, image, TWO, exclude)
    assert set(labels.unique().tolist()) == {1, IGNORE} and labels[0, 0] == IGNORE  # no background channel
    with_bg = hard_labels(maps, present, image, WITH_BACKGROUND, None)
    # Background (1 - max) wins on the left half; the present class is channel 2 of [bg, a, b].
    assert (with_bg[:, :3] == 0).all() and (with_bg[:, 5:] == 2).all()


# -- fitting and pseudo-labelling -----------------------------------------------------------------
class _Squares(torch.utils.data.Dataset):
    """Images whose left half is dark (class a) and right half bright (class b), some with one class only."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        image = torch.full((3, 40, 40), 0.2)
        label = torch.tensor([1.0, 1.0])
        if index % 2:
            image[:, :, 20:] = 0.9
        else:
            label = torch.tensor([1.0, 0.0]) if index == 0 else torch.tensor([0.0, 1.0])
            image[:] = 0.2 if index == 0 else 0.9
        return {"image": image, "label": label, "id": f"sq{index}"}


def _fitted(tiny_weights, tmp_path, label_space=TWO, **options):
    name, path = tiny_weights
    method = create_method(
        "weclip", clip_model=name, clip_weights=str(path), crop_size=32, batch_size=2, **options
    )
    extractor = ready(method, tiny_model())
    method.setup(_Domain(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    context = FitContext(
        dataset=_Squares(), extractor=extractor, domain=_Domain(), label_space=label_space,
        mean=(0.5,) * 3, std=(0.25,) * 3, cache_dir=tmp_path / "fitted", settings=extractor_settings(extractor),
    )  # fmt: skip
    return method, context


def test_fit_trains_only_the_decoder_and_its_loss_falls(tiny_weights, tmp_path):
    method, context = _fitted(tiny_weights, tmp_path, steps=30, switch=1.0)
    clip = method._clip(torch.device("cpu")).model
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    method.fit(context)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    losses = method.losses
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    fresh = method._new_decoder(clip.visual, TWO)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), method.decoder.state_dict().values(), strict=True)
    ]
    assert all(changed)


def test_labels_switch_to_the_decoder_affinity_halfway(tiny_weights, tmp_path, monkeypatch):
    import wsss_domains.methods.weclip as weclip

    used = []
    original = weclip.weclip_maps

    def recording(*args):
        used.append(args[-1] is not None)
        return original(*args)

    monkeypatch.setattr(weclip, "weclip_maps", recording)
    method, context = _fitted(tiny_weights, tmp_path, steps=4, switch=0.5)
    method.fit(context)
    assert used == [False] * 4 + [True] * 4  # 2 images per step; the last 2 of 4 steps use the decoder


def test_refine_writes_present_classes_and_reloads_the_fitted_decoder(tiny_weights, tmp_path):
    method, context = _fitted(tiny_weights, tmp_path, steps=4, switch=0.5)
    method.fit(context)
    image = _Squares()[1]["image"]
    cams = torch.full((2, 40, 40), 0.3)
    one = RefineContext.of(image, torch.tensor([0.0, 1.0]), _Domain(), TWO)
    out = method.refine(cams, one)
    assert out.shape == cams.shape and torch.equal(out[0], cams[0])
    assert out[1].min() >= 0 and out[1].max() <= 1 and not torch.equal(out[1], cams[1])
    both = method.refine(cams, RefineContext.of(image, torch.ones(2), _Domain(), TWO))
    assert not torch.equal(both[0], cams[0])
    again, context2 = _fitted(tiny_weights, tmp_path, steps=4, switch=0.5)
    again.fit(context2)  # from the cache: no training
    assert again.losses == [] and torch.equal(again.refine(cams, one), out)
    decoder_out, context3 = _fitted(tiny_weights, tmp_path, steps=4, switch=0.5, output="decoder")
    decoder_out.fit(context3)
    probs = decoder_out.refine(cams, RefineContext.of(image, torch.ones(2), _Domain(), TWO))
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 40))  # softmax over the two present classes


def test_listed_options_checked_and_fails_clearly_without_clip_weights(tmp_path, capsys):
    assert "weclip" in list_methods()
    assert main(["methods"]) == 0
    assert "weclip" in capsys.readouterr().out
    for bad in ({"steps": 0}, {"switch": 1.5}, {"output": "both"}):
        with pytest.raises(ValueError):
            create_method("weclip", **bad)
    method = create_method("weclip", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), (0.5,) * 3, (0.25,) * 3)


def test_pseudo_labels_through_the_engine(tiny_weights, tmp_path, monkeypatch):
    """``pseudo-labels --method weclip`` on a fake run: fitted once on the training split, cached, labels written."""
    name, path = tiny_weights
    monkeypatch.setattr(fakes.FakeDomain, "clip_prompts", _Domain.clip_prompts)
    fakes.register()
    try:
        root = fakes.write_shapes(tmp_path / "data", n_train=3, n_val=2, n_unlabelled=0)
        run = tmp_path / "run"
        fast = [
            "--backbone",
            fakes.FAST_BACKBONE,
            "--weights",
            "random",
            "--image-size",
            "32",
            "--batch-size",
            "2",
        ]
        fast += ["--max-steps", "1", "--device", "cpu", "--no-progress"]
        assert (
            main(["train", "--domain", fakes.FAKE_DOMAIN, "--data", str(root), "--out", str(run), *fast]) == 0
        )
        options = [f"clip_model={name}", f"clip_weights={path}", "steps=2", "batch_size=1", "crop_size=32"]
        args = [
            "pseudo-labels",
            "--run",
            str(run),
            "--data",
            str(root),
            "--split",
            "val",
            "--method",
            "weclip",
        ]
        for option in options:
            args += ["--method-option", option]
        out = tmp_path / "pl"
        assert main([*args, "--device", "cpu", "--no-progress", "--no-overlays", "--out", str(out)]) == 0
    finally:
        fakes.unregister()
    assert len(list(out.glob("*.png"))) == 2
    assert len(list((run / "fitted").glob("weclip-*.pt"))) == 1
