"""CARB's segmenter loss against a transcription of the official ``CARBHead.losses``, and through ``segment``."""

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
from wsss_domains.segmentation.carb import CarbOptions, CarbTask

IGNORE = 255


pytestmark = pytest.mark.usefixtures("fake_domain")


class OfficialCarb:
    """``carb_head.py: CARBHead.losses`` after the warm-up, the global view only (no CLIP patch),
    ``adaptive=True``, ``queue_size=5``; ``masked_cross_entropy`` is a mean cross-entropy."""

    def __init__(self, coeff: float = 1.0, queue_size: int = 5) -> None:
        self.coeff = coeff
        self.queue_size = queue_size
        self.and_losses = torch.zeros(queue_size)
        self.vit_losses = torch.zeros(queue_size)
        self._iter_counter = 0

    def __call__(
        self, seg_logit: torch.Tensor, seg_label: torch.Tensor, img_label: torch.Tensor, partial=None
    ) -> torch.Tensor:
        self._iter_counter += 1  # CARBHead.forward counts before the losses
        with torch.no_grad():
            gt_self = seg_logit * img_label.unsqueeze(-1).unsqueeze(-1)
            gt_self = gt_self.argmax(dim=1)
            label_and = seg_label.clone()
            label_vit = seg_label.clone()
            label_and[seg_label != gt_self] = 255
            label_vit[seg_label == gt_self] = 255
        loss_and = F.cross_entropy(seg_logit, label_and, ignore_index=255)
        loss_vit = F.cross_entropy(seg_logit, label_vit, ignore_index=255)
        with torch.no_grad():
            self.and_losses[self._iter_counter % self.queue_size] = loss_and
            self.vit_losses[self._iter_counter % self.queue_size] = loss_vit
            coeff_loss = self.coeff * self.and_losses.mean() / self.vit_losses.mean()
        if partial is None:
            return loss_and + loss_vit * coeff_loss
        hpos, wpos, croph, cropw, partial_label = partial
        partial_logit = seg_logit[:, :, hpos : hpos + croph, wpos : wpos + cropw].clone()
        partial_and = partial_label.detach().clone()
        partial_and[partial_and != gt_self[:, hpos : hpos + croph, wpos : wpos + cropw]] = 255
        partial_dif = partial_label.detach().clone()
        partial_dif[partial_and != 255] = 255
        loss_partand = F.cross_entropy(partial_logit, partial_and, ignore_index=255)
        loss_partdif = F.cross_entropy(partial_logit, partial_dif, ignore_index=255)
        return loss_and + loss_vit * coeff_loss + loss_partand + loss_partdif * coeff_loss


def image_labels(labels: torch.Tensor, classes: int) -> torch.Tensor:
    out = torch.zeros(labels.shape[0], classes)
    for i in range(labels.shape[0]):
        for c in range(classes):
            if (labels[i] == c).any():
                out[i, c] = 1
    return out


def test_balanced_loss_and_adaptive_weight_follow_the_official_head():
    torch.manual_seed(0)
    task = CarbTask(nn.Identity(), num_classes=4, ignore_index=IGNORE)
    official = OfficialCarb()
    for _ in range(8):
        logits = torch.randn(2, 4, 6, 7, requires_grad=True)
        labels = torch.randint(0, 3, (2, 6, 7))  # class 3 absent everywhere
        labels[0, :2] = IGNORE
        want = official(logits, labels, image_labels(labels, 4))
        task.step_count += 1
        got, logged = task.carb_loss(logits, labels)
        torch.testing.assert_close(got, want)
        assert 0 < logged["agreeing_fraction"] < 1
    assert task.coeff_loss != 1.0  # the queues moved the weight


def test_the_local_view_terms_follow_the_official_head():
    torch.manual_seed(3)
    task = CarbTask(nn.Identity(), num_classes=4, ignore_index=IGNORE)
    official = OfficialCarb()
    for _ in range(6):
        logits = torch.randn(2, 4, 8, 10, requires_grad=True)
        labels = torch.randint(0, 3, (2, 8, 10))  # class 3 absent: its logit is zeroed in the split
        window = (2, 3, 4, 5)
        patch_labels = torch.randint(0, 4, (2, 4, 5))
        want = official(logits, labels, image_labels(labels, 4), (*window, patch_labels))
        task.step_count += 1
        got, _ = task.carb_loss(logits, labels, (window, patch_labels))
        torch.testing.assert_close(got, want)


def test_local_view_labels_are_maskclip_arg_max_of_the_resized_patch():
    from wsss_domains.clip.maskclip import dense_features
    from wsss_domains.clip.tiny import tiny_clip
    from wsss_domains.clip.vit import prepare_pixels
    from wsss_domains.segmentation.carb import LocalView

    model, _ = tiny_clip(seed=2)
    text = torch.randn(3, 32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    view = LocalView(model, text, mean, std, rate=0.0, offset=2.0)  # a fixed factor of 2
    raw = torch.rand(2, 3, 12, 20)
    images = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    present = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    got = view.labels(images, present)
    pixels = torch.cat([prepare_pixels(model, r, (24, 40)) for r in raw])  # 2 x (12, 20), up to 8 px patches
    features, _ = dense_features(model.visual, pixels)
    cosine = torch.einsum("bchw,kc->bkhw", features, F.normalize(text, dim=-1)) * present[:, :, None, None]
    want = F.interpolate(cosine, size=(12, 20), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(got, want)


def test_an_absent_class_logit_is_zeroed_not_removed_as_officially():
    task = CarbTask(nn.Identity(), num_classes=3, ignore_index=IGNORE, options=CarbOptions(adaptive=False))
    logits = torch.full((1, 3, 2, 2), -1.0)
    logits[:, 0] = -0.5  # the only present class, but below the absent classes' zeroed logits
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    loss, logged = task.carb_loss(logits, labels)
    assert logged["agreeing_fraction"] == 0.0  # argmax(logits * present) is an absent class everywhere
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))  # all in the weighted term, c = 1


def test_plain_cross_entropy_until_the_warm_up_ends():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, 1)
    task = CarbTask(conv, num_classes=3, ignore_index=IGNORE)
    task.log = lambda *args, **kwargs: None  # no trainer attached
    images = torch.randn(2, 3, 5, 5)
    labels = torch.randint(0, 3, (2, 5, 5))
    batch = {"image": images, "mask": labels}
    torch.testing.assert_close(task.training_step(batch, 0), F.cross_entropy(conv(images), labels))
    task.training_progress = 0.5
    expected = OfficialCarb()
    expected._iter_counter = 1  # the first step counted already
    torch.testing.assert_close(
        task.training_step(batch, 1), expected(conv(images), labels, image_labels(labels, 3))
    )


def test_segment_with_carb_logs_its_weight(tmp_path: Path):
    root, run, pl = fakes.pseudo_labelled_run(tmp_path)
    seg = tmp_path / "seg"
    args = ["segment", "--run", run, "--pseudo-labels", pl, "--data", root, "--split", "train", "--out", seg]
    args += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--max-steps", "4"]
    assert main([str(a) for a in [*args, "--seg-training", "carb", "--device", "cpu", "--no-progress"]]) == 0
    assert json.loads((seg / "segmenter.json").read_text())["training"] == "carb"
    assert "train/coeff" in (seg / "logs" / "metrics.csv").read_text()


def test_segment_with_carb_and_a_clip_local_view(tmp_path: Path, monkeypatch):
    from wsss_domains.clip.tiny import save_tiny_clip
    from wsss_domains.domains import ClipPrompts

    monkeypatch.setattr(
        fakes.FakeDomain,
        "clip_prompts",
        lambda self, space: ClipPrompts(
            {c: (c,) for c in space.foreground_names}, background=("ground", "sky")
        ),
    )
    weights, _ = save_tiny_clip(tmp_path, "wsss-tiny-carb", seed=1)
    root, run, pl = fakes.pseudo_labelled_run(tmp_path)
    seg = tmp_path / "seg"
    common = ["segment", "--run", run, "--pseudo-labels", pl, "--data", root, "--split", "train"]
    common += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--max-steps", "3"]
    common += [
        "--carb-clip-model",
        "wsss-tiny-carb",
        "--carb-clip-weights",
        weights,
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([str(a) for a in [*common, "--seg-training", "carb", "--out", seg]]) == 0
    assert "train/coeff" in (seg / "logs" / "metrics.csv").read_text()
    # The local view's CLIP is for CARB only, and missing weights fail before anything trains.
    assert main([str(a) for a in [*common, "--seg-training", "cross-entropy", "--out", tmp_path / "x"]]) != 0
    missing = [str(a) for a in common]
    missing[missing.index(str(weights))] = str(tmp_path / "none.pt")
    assert main([*missing, "--seg-training", "carb", "--out", str(tmp_path / "y")]) != 0
    assert not (tmp_path / "y").exists()
