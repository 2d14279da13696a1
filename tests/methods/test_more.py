"""MoRe against transcriptions of zwyang6/MoRe (GCA.py, losses.py, mat_vit.py), then training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_training import changed, train_steps

from wsss_domains.methods import create_method, list_methods
from wsss_domains.methods.more import (
    ClassTokens,
    GraphCategoryRepresentation,
    LamExtractor,
    certain_patches_loss,
    distinct_tokens_loss,
    region_of_labels,
    token_pass,
    uncertain_patches_loss,
    uncertain_tokens,
)
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.models.vit import VitCamClassifier

VIT = "vit_tiny_patch16_224"


def _official_gca(
    module: GraphCategoryRepresentation, cls_tokens: torch.Tensor, feats: torch.Tensor, ratio=0.5
):
    """``graphic_cls_aggregation.forward``, statement by statement, on the module's weights."""
    topk = int(ratio * cls_tokens.shape[1])
    x = torch.concat([cls_tokens, feats.clone().detach()], dim=1)
    e_h = module.head_proj(cls_tokens)
    e_t = module.tail_proj(x)
    attn_logit = (e_h * module.scale) @ e_t.transpose(-2, -1)
    weight_topk, index_topk = torch.topk(attn_logit, k=topk, dim=-1)
    index_topk_expanded = index_topk.expand(e_t.size(0), -1, -1)
    batch_indices = torch.arange(e_t.size(0)).view(-1, 1, 1)
    nb_h = e_t[batch_indices, index_topk_expanded, :]
    topk_prob = F.softmax(weight_topk, dim=2)
    eh_r = torch.matmul((1 - topk_prob).unsqueeze(-1), e_h.unsqueeze(2)) + torch.mul(
        topk_prob.unsqueeze(-1), nb_h
    )
    e_h_expand = e_h.unsqueeze(2).expand(-1, -1, topk, -1)
    gate = torch.tanh(e_h_expand + eh_r)
    ka_weight = torch.einsum("ijkl,ijkm->ijk", nb_h, gate)
    ka_prob = F.softmax(ka_weight, dim=2).unsqueeze(dim=2)
    e_nh = torch.matmul(ka_prob, nb_h).squeeze(dim=2)
    sum_embedding = F.leaky_relu(module.linear1((e_h + e_nh) * 0.1 + cls_tokens))
    bi_embedding = F.leaky_relu(module.linear2(e_h * e_nh * 0.1 + cls_tokens))
    return module.norm(sum_embedding + bi_embedding)


def test_graph_category_representation_matches_the_official_module():
    torch.manual_seed(0)
    module = GraphCategoryRepresentation(8)
    cls_tokens, feats = torch.randn(2, 4, 8), torch.randn(2, 5, 8)  # 4 classes: top-2 neighbours
    torch.testing.assert_close(module(cls_tokens, feats), _official_gca(module, cls_tokens, feats))
    six = torch.randn(2, 6, 8)  # 6 classes: top-3
    torch.testing.assert_close(module(six, feats), _official_gca(module, six, feats))


def test_distinct_tokens_loss_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]])
    units = F.normalize(tokens[0], dim=-1).tolist()
    total = 0.0
    for j in range(3):  # cross-entropy over the class axis: column j should pick row j
        logits = [sum(a * b for a, b in zip(units[i], units[j], strict=True)) / 0.07 for i in range(3)]
        total += -(logits[j] - math.log(sum(math.exp(v) for v in logits)))
    assert float(distinct_tokens_loss(tokens)) == pytest.approx(total / 3, rel=1e-5)


def test_certain_patches_loss_by_hand():
    """``CRELoss_neg``: unit class tokens against detached, unnormalised patch tokens."""
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # 2 classes, D = 2
    features = torch.tensor([[[[0.5, -0.2, 1.0]], [[0.1, 0.4, -0.3]]]])  # D x 1 x 3 patches
    token_labels = torch.tensor([[[1, 2, 1]]])
    labels = torch.tensor([[1.0, 0.0]])  # only class 0 present: class 1's patches do not count
    t = 0.5
    unit = [1.0, 0.0]
    patches = [(0.5, 0.1), (-0.2, 0.4), (1.0, -0.3)]
    e = [math.exp((unit[0] * p[0] + unit[1] * p[1]) / t) for p in patches]
    nll = [-math.log(v / (sum(e) + 1e-4)) for v in e]
    expected = (nll[0] + nll[2]) / (2 + 1e-4)
    got = certain_patches_loss(tokens, features, token_labels, labels, t)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    features.requires_grad_(True)
    certain_patches_loss(tokens.requires_grad_(True), features, token_labels, labels, t).backward()
    assert features.grad is None and tokens.grad.abs().sum() > 0  # the patch tokens are detached


def _official_kernel_search(patch_tokens, roi_mask, selected_num=8, kernel_size=6):
    """``URELoss_neg.uncertain_kernel_search`` as released."""
    un_tokens = []
    b, c, h, w = patch_tokens.shape
    margin = kernel_size // 2
    for i1 in range(b):
        roi_un_tokens = []
        roi_index = (roi_mask[i1, margin : (h - margin), margin : (w - margin)] == 1).nonzero()
        for i2 in range(roi_index.shape[0]):
            h0, w0 = roi_index[i2, 0], roi_index[i2, 1]
            temp_mask = roi_mask[i1, h0 : (h0 + kernel_size), w0 : (w0 + kernel_size)]
            if temp_mask.sum() / (kernel_size * kernel_size) >= 1.2:
                roi_un_tokens.append(patch_tokens[i1, :, h0, w0])
        if len(roi_un_tokens) > selected_num:
            rand_index = torch.randperm(len(roi_un_tokens))
            roi_un_tokens_ = torch.stack(roi_un_tokens, dim=0)[rand_index[:selected_num]]
        else:
            add_idx = (selected_num - len(roi_un_tokens)) // 4
            pos_roi_index = (roi_mask[i1, margin : (h - margin), margin : (w - margin)] == 2).nonzero()
            if pos_roi_index.shape[0] < add_idx:
                pos_roi_index = (roi_mask[i1, margin : (h - margin), margin : (w - margin)] >= 0).nonzero()
            rand_index = torch.randperm(pos_roi_index.shape[0])
            pos_index = pos_roi_index[rand_index[:add_idx], :]
            for ip in range(pos_index.shape[0]):
                h0, w0 = pos_index[ip, 0], pos_index[ip, 1]
                roi_un_tokens.append(patch_tokens[i1, :, h0, w0])
            roi_un_tokens_ = torch.stack(roi_un_tokens, dim=0)
        un_tokens.append(roi_un_tokens_)
    return un_tokens


def test_uncertain_tokens_follow_the_official_search():
    features = torch.randn(3, 4, 14, 14, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(3, 14, 14, dtype=torch.long)
    labels[0] = 1  # foreground with an uncertain core: many windows qualify, 8 drawn at random
    labels[0, 2:12, 2:12] = 255
    labels[1, 5:8, 5:8] = 255  # a few uncertain tokens, windows too sparse: fill from foreground
    labels[1, 0:14, 8:14] = 1
    labels[2, 3:14, 3:14] = 255  # 5 windows qualify: kept, none added ((8 - 5) // 4 = 0)
    labels[2, 3:14, 9:14] = 2
    roi = region_of_labels(labels)
    assert roi[0, 5, 5] == 1 and roi[1, 0, 10] == 2 and roi[1, 0, 0] == 0
    torch.manual_seed(5)
    ours = uncertain_tokens(features, roi)
    torch.manual_seed(5)
    official = _official_kernel_search(features, roi)
    assert [t.shape[0] for t in ours] == [t.shape[0] for t in official] == [8, 2, 5]
    for a, b in zip(ours, official, strict=True):
        torch.testing.assert_close(a, b)


def test_uncertain_patches_loss_by_hand():
    tokens = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # 3 classes, one-hot
    features = torch.zeros(1, 3, 7, 7)
    features[0, :, 0, 0] = torch.tensor([3.0, -4.0, 0.0])  # the uncertain token (official indexing)
    labels_map = torch.zeros(1, 7, 7, dtype=torch.long)
    labels_map[0, :, :] = 255  # uncertain (1 in the region map) everywhere...
    labels_map[0, 0:2, 0:4] = 1  # ...but 8 foreground cells (2): the window at (0, 0) sums to 44 >= 1.2 * 36
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    # inner 1 x 1 map: the only candidate is (0, 0), token features[:, 0, 0]: unit (0.6, -0.8, 0);
    # with 1 of 8 found, (8 - 1) // 4 = 1 more is drawn from the inner map: the same token again
    cos = [0.6, 0.8, 0.0]
    pull = 1 - (cos[0] + cos[2]) / (2 + 1)
    push = cos[1] / (1 + 1)
    expected = 0.5 * pull + 0.5 * push
    features.requires_grad_(True)
    tokens.requires_grad_(True)
    loss = uncertain_patches_loss(tokens, features, labels_map, labels)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert tokens.grad is None and features.grad[0, :, 0, 0].abs().sum() > 0  # class tokens detached


@pytest.fixture(scope="module")
def vit() -> VitCamClassifier:
    torch.manual_seed(0)
    return VitCamClassifier(num_classes=3, backbone=VIT, weights="random").eval()


def test_class_tokens_start_from_the_backbone_class_token(vit):
    tokens = ClassTokens(vit.backbone, 3)
    assert tokens.tokens.shape == (1, 7, 192)
    torch.testing.assert_close(tokens.tokens, vit.backbone.cls_token.expand(-1, 7, -1))
    torch.testing.assert_close(tokens.pos[:, 4:], vit.backbone.pos_embed[:, :1].expand(-1, 3, -1))
    assert float(tokens.pos[:, :4].detach().std()) > 0.3  # the official reload's unit-variance draw


def test_token_pass_equals_a_timm_vit_with_these_prefix_tokens(vit):
    """Reference: timm's own prefix-token ViT (class token + register tokens, all position-embedded)."""
    import timm

    torch.manual_seed(1)
    tokens = ClassTokens(vit.backbone, 3)
    with torch.no_grad():
        tokens.tokens.normal_()
    reference = timm.create_model(
        VIT, pretrained=False, num_classes=0, global_pool="", reg_tokens=6, dynamic_img_size=True
    ).eval()
    state = {k: v for k, v in vit.backbone.state_dict().items() if k not in ("cls_token", "pos_embed")}
    state["cls_token"] = tokens.tokens[:, :1]
    state["reg_token"] = tokens.tokens[:, 1:]
    state["pos_embed"] = torch.cat([tokens.pos, vit.backbone.pos_embed[:, 1:]], dim=1)
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        class_tokens, features, aux = token_pass(vit, tokens, x)
        final, intermediates = reference.forward_intermediates(x, indices=[9], norm=False, output_fmt="NLC")
    assert class_tokens.shape == (2, 3, 192) and features.shape == (2, 192, 3, 4)
    torch.testing.assert_close(class_tokens, final[:, 4:7])
    torch.testing.assert_close(features, final[:, 7:].transpose(1, 2).reshape(2, 192, 3, 4))
    torch.testing.assert_close(aux, intermediates[0].transpose(1, 2).reshape(2, 192, 3, 4))


def test_lam_is_patch_tokens_dot_gcr_tokens_min_max_scaled(vit):
    method = create_method("more")
    modules = method.build_modules(vit).eval()
    extractor = method.extractor(vit, modules, scales=(1.0,), flip=False)
    assert isinstance(extractor, LamExtractor)
    image = torch.randn(3, 64, 48)
    with torch.no_grad():
        class_tokens, features, _ = token_pass(vit, modules["tokens"], image[None])
        gcr = modules["gcr"](class_tokens, features.flatten(2).transpose(1, 2))
        lam = torch.einsum("bchw,bkc->bkhw", features, gcr)
        lam = F.interpolate(lam, size=(64, 48), mode="bilinear", align_corners=False)[0]
    lam = lam - lam.amin(dim=(1, 2), keepdim=True)
    expected = lam / (lam.amax(dim=(1, 2), keepdim=True) + 1e-5)
    torch.testing.assert_close(extractor(image), expected)
    with pytest.raises(Exception, match="min-max"):
        method.extractor(vit, modules, normalization="sigmoid")


def test_two_training_steps_on_a_tiny_vit():
    method = create_method("more", warmup=0.0, seg_channels=16)
    torch.manual_seed(0)
    model = VitCamClassifier(num_classes=2, backbone=VIT, weights="random")
    cls_token = model.backbone.cls_token.detach().clone()
    task, logged, initial = train_steps(method, model=model)
    for name in (
        "train/cls_loss",
        "train/cls_aux",
        "train/distinct",
        "train/ptc",
        "train/cle",
        "train/une",
        "train/seg",
    ):
        assert name in logged and math.isfinite(logged[name]), name
    for prefix in ("tokens", "gcr", "aux_head", "seg"):
        assert changed(task, initial, prefix), prefix
    torch.testing.assert_close(task.model.backbone.cls_token, cls_token)  # replaced by MoRe's tokens
    assert not task.model.backbone.cls_token.requires_grad  # so DDP does not wait for its gradient
    image = torch.randn(3, 32, 48)
    cams = method.extractor(task.model, task.method_modules, scales=(1.0,))(image)
    assert cams.shape == (2, 32, 48) and float(cams.amin()) == 0.0 and float(cams.amax()) <= 1.0
    # A finished run reloads from the two state dicts alone (as load_run does).
    model2 = VitCamClassifier(num_classes=2, backbone=VIT, weights="random")
    model2.load_state_dict(task.model.state_dict())
    modules2 = create_method("more", seg_channels=16).build_modules(model2)
    modules2.load_state_dict(task.method_modules.state_dict())
    again = method.extractor(model2.eval(), modules2.eval(), scales=(1.0,))(image)
    torch.testing.assert_close(again, cams)


def test_more_is_listed_and_needs_a_vit():
    assert "more" in list_methods()
    model = CamClassifier(num_classes=2, backbone="test_efficientnet", weights="random")
    with pytest.raises(ValueError, match="ViT"):
        create_method("more").build_modules(model)
    with pytest.raises(ValueError, match="gcr_ratio"):
        create_method("more", gcr_ratio=0.0)


def test_cle_labels_come_from_the_auxiliary_cams_then_the_final_ones(monkeypatch, vit):
    """``train_voc.py``: auxiliary CAMs at 0.5 / 0.25 up to ``cam2mask``, then final CAMs at 0.6 / 0.35."""
    from wsss_domains.methods import more

    method = create_method("more", warmup=1.0)  # no segmentation loss in this test
    modules = method.build_modules(vit).eval()
    image, labels = torch.randn(1, 3, 112, 112), torch.tensor([[1.0, 1.0, 0.0]])  # a 7 x 7 token grid
    cams = torch.rand(1, 6, 112, 112, generator=torch.Generator().manual_seed(2))  # final, then auxiliary
    monkeypatch.setattr(more, "multi_scale_cams", lambda fn, x, scales: cams)
    outputs = method.forward(vit, modules, {"image": image})
    for progress, source, (high, low) in ((0.2, cams[:, 3:], (0.5, 0.25)), (0.8, cams[:, :3], (0.6, 0.35))):
        batch = {"image": image, "label": labels, "progress": torch.tensor(progress)}
        losses = method.training_losses(vit, modules, batch, outputs)
        grid = F.interpolate(source, size=(7, 7), mode="bilinear", align_corners=False)
        value, index = (grid * labels[:, :, None, None]).max(dim=1)
        token_labels = index + 1
        token_labels[value <= high] = 255
        token_labels[value <= low] = 0
        expected = 0.2 * certain_patches_loss(
            outputs["class_tokens"], outputs["features"], token_labels, labels, 0.5
        )
        torch.testing.assert_close(losses["cle"], expected)
