"""Das et al. (CVPR 2023): the image-level loss, prototypes, anchor sampling and prototypical contrast
against transcriptions of the official code (anurag-198/WDASS ``loss/image_label.py``,
``utils/prototypes.py``, ``loss/contrast_loss.py``, ``loss/contrast_loss_intra.py``, ``ema_cls_2``),
written out here on the CPU; then the source-domain data and ``segment --seg-training das`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import fakes
import pytest
import torch
from fakes import fake_domain  # noqa: F401  (the module's fixture)
from torch import nn
from torch.nn import functional as F

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import main
from wsss_domains.domains.contract import LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.segmentation.das import (
    DasTask,
    class_mix_masks,
    image_level_loss,
    prototype_contrast,
    sample_anchors,
    update_prototypes,
)
from wsss_domains.segmentation.model import SegmenterConfig, build_segmenter, load_segmenter
from wsss_domains.segmentation.source_domain import class_lookup, parse_class_map

IGNORE = 255


pytestmark = pytest.mark.usefixtures("fake_domain")


# --- transcriptions of the official functions (``.cuda()`` dropped) ------------------------------


def official_image_loss(logits, classes):
    """loss/image_label.py ImageLevelLoss.forward, k = 1."""
    logits_flat = logits.view((logits.shape[0], logits.shape[1], -1))
    lse = torch.logsumexp(logits_flat, 2)
    lse = torch.log(torch.tensor(1 / logits_flat.shape[-1])) + lse
    return F.binary_cross_entropy(torch.sigmoid(lse), classes)


def official_prototypes(store, features, gt, pseudo_label=None, pseudo_label_conf=None):
    """utils/prototypes.py get_prototypes: type -1 (source, gt only) or type 0 (image labels:
    teacher labels under 0.95 confidence unknown; the target's gt all 255)."""
    gt = F.interpolate(gt.unsqueeze(1).float(), (features.shape[2], features.shape[3]), mode="nearest")
    gt = gt.squeeze(1).long()
    if pseudo_label is not None:
        pseudo_label[pseudo_label_conf < 0.95] = 255.0
        pseudo_label = pseudo_label.unsqueeze(1).float()
        big = F.interpolate(pseudo_label.clone(), (gt.shape[1], gt.shape[2]), mode="nearest")
        gt = gt.unsqueeze(1).float()
        big[gt != 255.0] = gt[gt != 255.0]
        big = F.interpolate(big, (pseudo_label.shape[2], pseudo_label.shape[3]), mode="nearest")
        pseudo_label = big.long().squeeze(1)
        gt = pseudo_label  # type 0
    else:
        pseudo_label = gt
    ft = features.clone().detach().permute(0, 2, 3, 1)
    for index in torch.unique(gt):
        if index != 255:
            mask = gt == index
            center = ft[mask].sum(dim=0) / mask.sum()
            fts = ft[pseudo_label == index]
            wt = torch.matmul(fts, center).view((-1, 1))
            wt = wt / wt.sum()
            store[index] = (wt * fts).sum(dim=0)
    return store


def official_sampling(X, y_hat, y, y_prob, max_samples, threshold, max_views=20, ignore_label=255):
    """contrast_loss.py PixelContrastLoss._hard_anchor_sampling (with the domain flag ``btch``)."""
    batch_size, feat_dim = X.shape[0], X.shape[-1]
    classes, total_classes = [], 0
    for ii in range(batch_size):
        this_y = y_hat[ii]
        this_classes = [x for x in torch.unique(this_y) if x != ignore_label]
        this_classes = [x for x in this_classes if (this_y == x).nonzero().shape[0] > max_views]
        classes.append(this_classes)
        total_classes += len(this_classes)
    if total_classes == 0:
        return None
    n_view = min(max_samples // total_classes, max_views)
    X_ = torch.zeros((total_classes, n_view, feat_dim))
    y_ = torch.zeros(total_classes)
    btch = torch.ones(total_classes)
    X_ptr = 0
    for ii in range(batch_size):
        this_y_hat, this_y, this_prob = y_hat[ii], y[ii], y_prob[ii]
        for cls_id in classes[ii]:
            hard_indices = ((this_y_hat == cls_id) & (this_y != cls_id)).nonzero()
            easy_indices = ((this_y_hat == cls_id) & (this_y == cls_id) & (this_prob > threshold)).nonzero()
            num_hard, num_easy = hard_indices.shape[0], easy_indices.shape[0]
            if num_hard >= n_view:
                num_hard_keep, num_easy_keep = n_view, 0
            elif num_hard + num_easy >= n_view:
                num_hard_keep, num_easy_keep = num_hard, n_view - num_hard
            else:
                continue
            if num_hard_keep > 0:
                hard_indices = hard_indices[torch.randperm(num_hard)[:num_hard_keep]]
            if num_easy_keep > 0:
                easy_indices = easy_indices[torch.randperm(num_easy)[:num_easy_keep]]
            if num_hard_keep == n_view:
                indices = hard_indices
            elif num_easy_keep == n_view:
                indices = easy_indices
            else:
                indices = torch.cat((hard_indices, easy_indices), dim=0)
            X_[X_ptr, :, :] = X[ii, indices, :].squeeze(1)
            y_[X_ptr] = cls_id
            if ii < batch_size / 2:
                btch[X_ptr] = 0
            X_ptr += 1
    return X_[:X_ptr], y_[:X_ptr], btch[:X_ptr]


def official_contrastive(feats_, labels_, prototypes, btch=None, temperature=0.1, base_temperature=0.07):
    """contrast_loss.py ``_contrastive`` (with ``btch``) and contrast_loss_intra.py's (without)."""
    n_view = feats_.shape[1]
    pt = prototypes[labels_.long()].repeat_interleave(n_view, dim=0).view(feats_.shape)
    labels_ = labels_.contiguous().view(-1, 1)
    mask = torch.eq(labels_, torch.transpose(labels_, 0, 1)).float()
    contrast_feature = torch.cat(torch.unbind(feats_, dim=1), dim=0)
    pt_features = torch.cat(torch.unbind(pt, dim=1), dim=0)
    anchor_dot_contrast = torch.div(torch.matmul(contrast_feature, pt_features.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(n_view, n_view)
    neg_mask = 1 - mask
    if btch is not None:
        btch = btch.contiguous().view(-1, 1)
        btch = torch.ne(btch, torch.transpose(btch, 0, 1)).float().repeat(n_view, n_view)
        mask = mask * btch
    neg_logits = (torch.exp(logits) * neg_mask).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + neg_logits)
    mean_log_prob_pos = (mask * log_prob).sum(1) / (mask.sum(1) + 1e-8)
    return (-1 * (temperature / base_temperature) * mean_log_prob_pos).mean()


# --- formulas -------------------------------------------------------------------------------------


def test_image_level_loss_is_the_official_log_mean_exp_pooled_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 5, generator=g) * 3
    classes = (torch.rand(3, 4, generator=g) > 0.5).float()
    assert torch.allclose(image_level_loss(logits, classes), official_image_loss(logits, classes), atol=1e-6)
    # With every pixel valid the mask changes nothing; a masked pixel leaves the pooling entirely.
    valid = torch.ones(3, 6, 5, dtype=torch.bool)
    assert torch.allclose(image_level_loss(logits, classes, valid), official_image_loss(logits, classes))
    valid[:, :, 3:] = False
    expected = official_image_loss(logits[..., :3].contiguous(), classes)
    assert torch.allclose(image_level_loss(logits, classes, valid), expected, atol=1e-6)


def test_prototypes_follow_get_prototypes_for_both_domains():
    g = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(2, 8, 5, 6, generator=g), dim=1)
    gt = torch.randint(0, 3, (2, 5, 6), generator=g)
    gt[0, 0] = IGNORE
    # Source (type -1): the ground truth, already on the feature grid.
    ours = update_prototypes(torch.zeros(4, 8), features, gt, IGNORE)
    theirs = official_prototypes(torch.zeros(4, 8), features, gt.clone())
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(ours[3], torch.zeros(8))  # a class absent from the step keeps its value
    # Target (type 0): the teacher's labels, unknown under 0.95 confidence, the target's gt all 255.
    teacher = torch.randint(0, 4, (2, 5, 6), generator=g)
    confidence = torch.rand(2, 5, 6, generator=g) * 0.1 + 0.9
    kept = torch.full((4, 8), 7.0)
    theirs = official_prototypes(
        kept.clone(), features, torch.full_like(gt, IGNORE), teacher.clone().float(), confidence
    )
    ours = update_prototypes(kept.clone(), features, teacher.masked_fill(confidence < 0.95, IGNORE), IGNORE)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("max_samples,threshold", [(512, 0.95), (256, 0.96), (40, 0.95)])
def test_anchor_sampling_replays_the_official_draws(max_samples: int, threshold: float):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(4, 300, 6, generator=g)
    labels = torch.randint(0, 3, (4, 300), generator=g)
    labels[1, :250] = IGNORE  # image 1 keeps too few pixels of any class
    labels[3, :150] = 2  # one class with many pixels
    predictions = torch.where(torch.rand(4, 300, generator=g) < 0.05, (labels + 1) % 3, labels)
    probabilities = 0.9 + 0.1 * torch.rand(4, 300, generator=g)  # about half above the thresholds
    torch.manual_seed(5)
    ours = sample_anchors(
        features, labels, predictions, probabilities, IGNORE, max_samples, threshold=threshold
    )
    torch.manual_seed(5)
    theirs = official_sampling(features, labels, predictions, probabilities, max_samples, threshold)
    assert ours is not None and theirs is not None
    anchors, classes, images = ours
    assert anchors.shape == theirs[0].shape and anchors.shape[0] > 0
    assert torch.equal(anchors, theirs[0])
    assert torch.equal(classes.float(), theirs[1])
    assert torch.equal((images >= 2).float(), theirs[2])  # the first half of the batch is the source


def test_anchor_sampling_needs_more_than_max_views_pixels_of_a_class():
    labels = torch.zeros(1, 20, dtype=torch.long)  # exactly max_views pixels: not enough
    features = torch.randn(1, 20, 3)
    assert sample_anchors(features, labels, labels, torch.ones(1, 20), IGNORE, 512) is None


@pytest.mark.parametrize("cross_domain", [True, False])
def test_prototype_contrast_is_the_official_contrastive(cross_domain: bool):
    g = torch.Generator().manual_seed(3)
    anchors = F.normalize(torch.randn(5, 4, 8, generator=g), dim=-1)
    classes = torch.tensor([0, 2, 0, 1, 2])
    prototypes = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    domains = torch.tensor([0, 0, 1, 1, 1]) if cross_domain else None
    ours = prototype_contrast(anchors, classes, prototypes, domains)
    theirs = official_contrastive(
        anchors, classes.float(), prototypes, None if domains is None else domains.float()
    )
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert ours > 0


def test_class_mix_pastes_half_the_batch_classes_rounded_up():
    labels = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [3, IGNORE]]])  # 5 ids over the batch
    torch.manual_seed(0)
    masks = class_mix_masks(labels)
    for label, mask in zip(labels, masks, strict=True):
        pasted = set(label[mask].tolist())
        assert not pasted & set(label[~mask].tolist())  # whole classes only
    # Over draws each image pastes ceil(5 / 2) = 3 of the batch's ids: on a map that holds all ids, 3 exactly.
    every = torch.tensor([[[0, 1, 2, 3, IGNORE]]])
    for seed in range(5):
        torch.manual_seed(seed)
        assert int(class_mix_masks(every).sum()) == 3


def test_the_teacher_is_ema_cls_2s_average_of_weights_and_buffers():
    model = tiny_segmenter()
    task = DasTask(model, 3, IGNORE)
    before = {k: v.clone() for k, v in task.teacher["model"].state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for name, buffer in model.named_buffers():
            if "running_mean" in name:
                buffer.add_(2.0)
            if "num_batches_tracked" in name:
                buffer.add_(7)
    student = model.state_dict()
    task.update_teacher()
    for key, value in task.teacher["model"].state_dict().items():
        if "num_batches_tracked" in key:
            assert torch.equal(value, student[key])
        else:
            assert torch.allclose(value, before[key] * 0.999 + 0.001 * student[key], atol=1e-6), key
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_the_teacher_moves_after_optimiser_steps_only(monkeypatch):
    """With --seg-accumulate-batches 2 the batches alternate between accumulating and stepping."""
    task = DasTask(tiny_segmenter(), 3, IGNORE)
    step = {"now": 5}  # a resumed run
    monkeypatch.setattr(DasTask, "global_step", property(lambda self: step["now"]))
    updates = []
    monkeypatch.setattr(task, "update_teacher", lambda: updates.append(step["now"]))
    task.on_train_start()
    for after in (5, 6, 6, 7):  # global_step after each batch: accumulate, step, accumulate, step
        step["now"] = after
        task.on_train_batch_end(None, None, 0)
    assert updates == [6, 7]


def tiny_segmenter() -> nn.Module:
    config = SegmenterConfig(domain="fake", dataset="x", classes=["a", "b", "c"], arch="fpn",
                             encoder=fakes.FAST_BACKBONE, weights="random")  # fmt: skip
    return build_segmenter(config)


def test_before_the_warm_up_only_the_source_and_mixed_cross_entropies_count():
    torch.manual_seed(0)
    task = DasTask(tiny_segmenter(), 3, IGNORE)
    logged: dict[str, torch.Tensor] = {}
    task.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # type: ignore[method-assign]
    batch = {key: torch.randn(2, 3, 64, 64) for key in ("image", "source_image")}
    batch |= {key: torch.randint(0, 3, (2, 64, 64)) for key in ("mask", "source_mask")}
    task.training_progress = 0.05  # official: iteration 7,500 of 150,000, before 10,000
    loss = task.training_step(batch, 0)
    assert set(logged) == {"train/loss", "train/seg_source", "train/seg_mixed"}
    assert torch.allclose(loss, logged["train/seg_source"] + logged["train/seg_mixed"])
    task.training_progress = 0.07
    logged.clear()
    loss = task.training_step(batch, 0)
    parts = ("seg_source", "seg_mixed", "image_level", "contrast")
    assert torch.allclose(loss, sum(logged[f"train/{p}"] for p in parts))


def test_a_step_trains_student_and_projection_only():
    torch.manual_seed(0)
    task = DasTask(tiny_segmenter(), 3, IGNORE)
    task.training_progress = 0.5  # after the warm-up: every term
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "mask": torch.randint(0, 3, (2, 64, 64)),
        "source_image": torch.randn(2, 3, 64, 64),
        "source_mask": torch.randint(0, 3, (2, 64, 64)),
    }
    batch["mask"][:, :8] = IGNORE
    task.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert task.representation.weight.grad is not None and task.representation.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.source_prototypes.abs().sum() > 0  # every source class of the batch has its prototype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision (CUDA's 16-mixed runs the same code)
        assert torch.isfinite(task.training_step(batch, 1))
    groups = task.configure_optimizers().param_groups
    optimised = {id(p) for group in groups for p in group["params"]}
    assert id(task.representation.weight) in optimised
    assert not optimised & {id(p) for p in task.teacher.parameters()}


# --- source data and the command ------------------------------------------------------------------


def space(*names: str) -> LabelSpace:
    return LabelSpace(tuple(names), tuple((i, i, i) for i in range(len(names))))


def test_source_classes_map_by_name_or_explicitly():
    source, target = space("background", "building", "road", "water"), space("urban", "water")
    table = class_lookup(source, target, parse_class_map("building=urban, road=urban,background=ignore"))
    assert table[:4].tolist() == [IGNORE, 0, 0, 1]
    assert table[IGNORE] == IGNORE
    with pytest.raises(UserError, match="not classes of the source"):
        class_lookup(source, target, {"roads": "urban"})
    with pytest.raises(UserError, match="not classes of the target"):
        class_lookup(source, target, {"road": "street"})
    with pytest.raises(UserError, match="no source class"):
        class_lookup(space("a", "b"), target)
    with pytest.raises(UserError, match="SOURCE=TARGET"):
        parse_class_map("building:urban")


def test_segment_with_das_learns_from_an_annotated_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root, run, pl = fakes.pseudo_labelled_run(tmp_path)
    seg = tmp_path / "seg"
    common = ["segment", "--run", run, "--pseudo-labels", pl, "--data", root, "--split", "train"]
    common += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--device", "cpu"]
    assert main([str(a) for a in [*common, "--out", seg, "--seg-training", "das"]]) != 0
    assert "needs --source-data" in capsys.readouterr().err
    assert main([str(a) for a in [*common, "--out", seg, "--source-data", root]]) != 0
    assert "is for --seg-training das" in capsys.readouterr().err
    args = [*common, "--out", seg, "--seg-training", "das", "--source-data", root, "--source-split", "val"]
    args += ["--source-domain", fakes.FAKE_DOMAIN]
    assert main([str(a) for a in [*args, "--max-steps", "4", "--no-progress"]]) == 0
    config = json.loads((seg / "segmenter.json").read_text())
    assert config["training"] == "das"
    assert config["source"]["split"] == "val" and config["source"]["classes"] == {}
    assert config["source"]["domain"] == fakes.FAKE_DOMAIN
    log = (seg / "logs" / "metrics.csv").read_text()
    assert "train/seg_source" in log and "train/contrast" in log and "train/image_level" in log
    _, model = load_segmenter(seg)  # the student alone, as any segmenter
    assert model(torch.zeros(1, 3, 32, 32)).shape[1] == len(config["classes"])
