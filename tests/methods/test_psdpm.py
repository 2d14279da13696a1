"""PSDPM against a transcription of the official code (xinqiaozhao/PSDPM), then training.

``OfficialPsdpmNet`` is ``network/resnet50_psdpm.py``'s ``Net`` after the backbone (``forward`` from
``x2``, ``x3``, ``x4`` on, ``PCM``/``PCM2``/``PCM3`` and ``prototype``), with the ResNet-50 widths
(512, 1024, 2048) and the literal class count taken as arguments, and ``CAM.forward``'s multi-stage CAM;
``official_losses`` is one iteration of ``train_resnet50_psdpm.py`` from the two scales' outputs. Neither
imports the project's module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from method_training import changed, cli_train_and_pseudo_label, train_steps
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.errors import UserError
from wsss_domains.methods import create_method
from wsss_domains.methods.psdpm import PsdpmCamExtractor, PsdpmModules, psdpm_consistency, psdpm_maps
from wsss_domains.options import MethodOptionError

# ---------------------------------------------------------------------------------------------
# Transcription of the official code.
# ---------------------------------------------------------------------------------------------


def _official_norm(cam: Tensor, size, valid_mask: Tensor) -> Tensor:
    """The block the official ``forward`` repeats for each head."""
    norm_cam = F.relu(cam)
    norm_cam = norm_cam / (F.adaptive_max_pool2d(norm_cam, (1, 1)) + 1e-5)
    cam_bkg = 1 - torch.max(norm_cam, dim=1)[0].unsqueeze(1)
    norm_cam = torch.cat([cam_bkg, norm_cam], dim=1)
    return F.interpolate(norm_cam, size, mode="bilinear", align_corners=True) * valid_mask


class OfficialPsdpmNet(nn.Module):
    def __init__(self, c2: int, c3: int, c4: int, num_cls: int) -> None:
        super().__init__()
        self.num_cls = num_cls
        self.c2, self.c3, self.c4 = c2, c3, c4
        self.side2 = nn.Conv2d(c2, 128, 1, bias=False)
        self.side3 = nn.Conv2d(c3, 256, 1, bias=False)
        self.side4 = nn.Conv2d(c4, 256, 1, bias=False)
        self.classifier = nn.Conv2d(c4, self.num_cls - 1, 1, bias=False)
        self.classifier2 = nn.Conv2d(c3, self.num_cls - 1, 1, bias=False)
        self.classifier3 = nn.Conv2d(c2, self.num_cls - 1, 1, bias=False)
        self.f9 = torch.nn.Conv2d(c4 + 3, c4, 1, bias=False)
        self.f9_2 = torch.nn.Conv2d(c4, c4, 1, bias=False)
        self.f10 = torch.nn.Conv2d(c3 + 3, c3, 1, bias=False)
        self.f10_2 = torch.nn.Conv2d(c3, c3, 1, bias=False)
        self.f11 = torch.nn.Conv2d(c2 + 3, c2, 1, bias=False)
        self.f11_2 = torch.nn.Conv2d(c2, c2, 1, bias=False)

    def _pcm(self, conv_a, conv_b, width, rgb, f):
        """``PCM``/``PCM2``/``PCM3`` (identical but for the layers and the width); the CAM argument
        is only resized and returned by the official code, so it is left out."""
        rawf = f.clone()
        n, c, h, w = f.size()
        f = torch.cat([rgb, f], dim=1)
        f = conv_a(f)
        f = F.relu(f)
        f = conv_b(f).view(-1, h * w, width)
        f = F.relu(f)
        f = f.view(n, -1, h * w)
        aff = F.softmax(torch.matmul(f.transpose(1, 2), f), dim=-1)
        attn_output = torch.matmul(aff, rawf.view(n, -1, h * w).transpose(1, 2))
        return aff, attn_output

    def prototype(self, norm_cam, feature, feature2):
        seeds = norm_cam
        n, c, h, w = feature.shape
        seeds = F.interpolate(seeds, feature.shape[2:], mode="nearest")
        crop_feature = seeds.unsqueeze(2) * feature.unsqueeze(1)
        prototype = F.adaptive_avg_pool2d(crop_feature.view(-1, c, h, w), (1, 1)).view(
            n, self.num_cls, c, 1, 1
        )
        IS_cam = F.relu(torch.cosine_similarity(feature2.unsqueeze(1), prototype, dim=2))  # noqa: N806
        IS_cam = F.interpolate(IS_cam, feature.shape[2:], mode="bilinear", align_corners=True)  # noqa: N806
        return IS_cam

    def forward(self, x, x2, x3, x4, valid_mask, gt):
        size = x4.shape[2:]
        cam = self.classifier(x4)
        score = F.adaptive_avg_pool2d(cam, 1)
        orignal_cam = _official_norm(cam, size, valid_mask)
        cam = self.classifier2(x3)
        score += F.adaptive_avg_pool2d(cam, 1)
        orignal_cam2 = _official_norm(cam, size, valid_mask)
        orignal_cam = orignal_cam + orignal_cam2 * 0.5
        cam = self.classifier3(x2)
        score += F.adaptive_avg_pool2d(cam, 1)
        orignal_cam3 = _official_norm(cam, size, valid_mask)
        orignal_cam = (orignal_cam + orignal_cam3 * 0.25) / 1.75

        rgb = F.interpolate(x, x4.shape[2:], mode="bilinear", align_corners=True)
        _, attn_output = self._pcm(self.f9, self.f9_2, self.c4, rgb, x4)
        n, c, h, w = x4.size()
        att1 = attn_output.transpose(1, 2).reshape(n, c, h, w) + x4 * 5
        aff_v = self.classifier(att1)
        score += F.adaptive_avg_pool2d(aff_v, 1)
        aff_v = _official_norm(aff_v, size, valid_mask)

        rgb = F.interpolate(x, x3.shape[2:], mode="bilinear", align_corners=True)
        _, attn_output2 = self._pcm(self.f10, self.f10_2, self.c3, rgb, x3)
        n, c, h, w = x3.size()
        att2 = attn_output2.transpose(1, 2).reshape(n, c, h, w) + x3 * 5
        aff_v2 = self.classifier2(att2)
        score += F.adaptive_avg_pool2d(aff_v2, 1)
        aff_v2 = _official_norm(aff_v2, size, valid_mask)

        rgb = F.interpolate(x, x2.shape[2:], mode="bilinear", align_corners=True)
        _, attn_output3 = self._pcm(self.f11, self.f11_2, self.c2, rgb, x2)
        n, c, h, w = x2.size()
        att3 = attn_output3.transpose(1, 2).reshape(n, c, h, w) + x2 * 5
        aff_v3 = self.classifier3(att3)
        score += F.adaptive_avg_pool2d(aff_v3, 1)
        aff_v3 = _official_norm(aff_v3, size, valid_mask)

        cam22 = (aff_v + aff_v2 * 0.5 + aff_v3 * 0.25) / 1.75

        def hierarchical(a2, a3, a4):
            s2, s3, s4 = self.side2(a2), self.side3(a3), self.side4(a4)
            return torch.cat(
                [
                    F.interpolate(
                        s2 / (torch.norm(s2, dim=1, keepdim=True) + 1e-5), s3.shape[2:], mode="bilinear"
                    ),
                    F.interpolate(
                        s3 / (torch.norm(s3, dim=1, keepdim=True) + 1e-5), s3.shape[2:], mode="bilinear"
                    ),
                    F.interpolate(
                        s4 / (torch.norm(s4, dim=1, keepdim=True) + 1e-5), s3.shape[2:], mode="bilinear"
                    ),
                ],
                dim=1,
            )

        hie_fea = hierarchical(att3, att2, att1)
        hie_fea2 = hierarchical(x2, x3, x4)
        pcam = self.prototype(cam22, hie_fea.clone(), hie_fea2.clone()) * valid_mask
        gt = gt * valid_mask
        return {"score": score, "cam1": gt, "cam2": cam22, "orignal_cam": pcam, "affsum": orignal_cam}


def official_losses(outputs1, outputs2, label_fg: Tensor) -> dict[str, Tensor]:
    """``train_resnet50_psdpm.py``'s loss from the two scales' outputs (memory rows included)."""
    target = label_fg.unsqueeze(-1).unsqueeze(-1)
    loss_cls1 = F.multilabel_soft_margin_loss(outputs1["score"], target)
    cam1, cam_rv1, orignal_cam1 = outputs1["cam1"], outputs1["cam2"], outputs1["orignal_cam"]
    lo = torch.abs(cam1[:, :, :, :] - cam_rv1[:, :, :, :])
    lo += torch.abs(orignal_cam1[:, :, :, :] - cam_rv1[:, :, :, :]) * 0.05
    lossGSC = torch.mean(torch.abs(lo)) * 2  # noqa: N806
    loss_cls2 = F.multilabel_soft_margin_loss(outputs2["score"], target)
    lossCLS = (loss_cls1 + loss_cls2) / 2  # noqa: N806
    cam2, cam_rv2, orignal_cam2 = outputs2["cam1"], outputs2["cam2"], outputs2["orignal_cam"]
    cons = torch.abs(cam2[:, :, :, :] - cam_rv2[:, :, :, :])
    cons += torch.abs(orignal_cam2[:, :, :, :] - cam_rv2[:, :, :, :]) * 0.05
    loss_consistency = (cons).mean() * 0.4
    return {
        "cls": lossCLS,
        "gsc": lossGSC,
        "gsc_half": loss_consistency,
        "loss": lossCLS + lossGSC + loss_consistency,
    }


def copy_weights(official: OfficialPsdpmNet, ours: PsdpmModules, head: nn.Conv2d) -> None:
    head.weight.data.copy_(official.classifier.weight.data)
    pairs = [
        (ours.classifier2, official.classifier2), (ours.classifier3, official.classifier3),
        (ours.fpem[0].embed, official.f9), (ours.fpem[0].embed2, official.f9_2),
        (ours.fpem[1].embed, official.f10), (ours.fpem[1].embed2, official.f10_2),
        (ours.fpem[2].embed, official.f11), (ours.fpem[2].embed2, official.f11_2),
        (ours.side.sides[0], official.side2), (ours.side.sides[1], official.side3),
        (ours.side.sides[2], official.side4),
    ]  # fmt: skip
    for mine, theirs in pairs:
        mine.weight.data.copy_(theirs.weight.data)


# (batch, classes, image size, final/stride-16 grid, widths c2, c3, c4)
CASES = [
    (2, 3, (32, 40), (4, 5), (6, 7, 9)),
    (3, 1, (24, 24), (3, 3), (4, 5, 8)),
    (1, 5, (16, 32), (2, 4), (3, 6, 5)),
]


def _inputs(case, seed: int):
    n, k, (h, w), (fh, fw), (c2, c3, c4) = case
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, h, w, generator=gen)
    x2 = torch.randn(n, c2, 2 * fh, 2 * fw, generator=gen)
    x3 = torch.randn(n, c3, fh, fw, generator=gen)
    x4 = torch.randn(n, c4, fh, fw, generator=gen)
    labels = (torch.rand(n, k, generator=gen) < 0.5).float()
    labels[:, 0] = 1
    return image, x2, x3, x4, labels, gen


@pytest.mark.parametrize("case", CASES)
def test_maps_and_logits_match_official_forward(case):
    n, k, _, (fh, fw), (c2, c3, c4) = case
    image, x2, x3, x4, labels, gen = _inputs(case, 3 + k)
    official = OfficialPsdpmNet(c2, c3, c4, k + 1)
    ours, head = PsdpmModules((c2, c3, c4), k), nn.Conv2d(c4, k, 1, bias=False)
    copy_weights(official, ours, head)
    valid = torch.cat([torch.ones(n, 1), labels], dim=1)
    gt = torch.rand(n, k + 1, fh, fw, generator=gen)
    expected = official(image, x2, x3, x4, valid[:, :, None, None].expand(-1, -1, fh, fw), gt)
    got = psdpm_maps(ours, head, image, [x2, x3, x4], valid)
    torch.testing.assert_close(got["logits"], expected["score"].flatten(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["cam"], expected["affsum"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["fpem_cam"], expected["cam2"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["prototype_cam"], expected["orignal_cam"], rtol=1e-5, atol=1e-6)
    # The attention matters: without it (the FPEM's output of the plain stage) the FPEM CAM differs.
    assert float((got["fpem_cam"] - got["cam"]).abs().max()) > 1e-3


@pytest.mark.parametrize("case", CASES[:2])
def test_losses_and_gradients_match_official_iteration(case):
    n, k, _, (fh, fw), (c2, c3, c4) = case
    image, x2, x3, x4, labels, gen = _inputs(case, 20 + k)
    official = OfficialPsdpmNet(c2, c3, c4, k + 1)
    ours, head = PsdpmModules((c2, c3, c4), k), nn.Conv2d(c4, k, 1, bias=False)
    copy_weights(official, ours, head)
    valid = torch.cat([torch.ones(n, 1), labels], dim=1)
    gt = torch.rand(n, k + 1, fh, fw, generator=gen)
    half = [
        F.interpolate(t, scale_factor=0.5, mode="bilinear", align_corners=True) for t in (image, x2, x3, x4)
    ]
    gt_half = F.interpolate(gt, size=half[3].shape[-2:], mode="bilinear")

    def masked(size):
        return valid[:, :, None, None].expand(-1, -1, *size)

    out1 = official(image, x2, x3, x4, masked((fh, fw)), gt)
    out2 = official(*half, masked(half[3].shape[-2:]), gt_half)
    expected = official_losses(out1, out2, labels)
    expected["loss"].backward()

    got1 = psdpm_maps(ours, head, image, [x2, x3, x4], valid)
    got2 = psdpm_maps(ours, head, half[0], half[1:], valid)
    mask = valid[:, :, None, None]
    cls = (
        F.multilabel_soft_margin_loss(got1["logits"], labels)
        + F.multilabel_soft_margin_loss(got2["logits"], labels)
    ) / 2
    gsc = 2.0 * psdpm_consistency(gt * mask, got1["fpem_cam"], got1["prototype_cam"], 0.05)
    gsc_half = 0.4 * psdpm_consistency(gt_half * mask, got2["fpem_cam"], got2["prototype_cam"], 0.05)
    (cls + gsc + gsc_half).backward()
    for name, value in (("cls", cls), ("gsc", gsc), ("gsc_half", gsc_half)):
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-5), name
    torch.testing.assert_close(head.weight.grad, official.classifier.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.fpem[1].embed.weight.grad, official.f10.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        ours.side.sides[0].weight.grad, official.side2.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_consistency_formula_on_hand_values():
    baseline = torch.tensor([[[[1.0, 0.0]]]])
    fpem = torch.tensor([[[[0.5, 0.5]]]])
    proto = torch.tensor([[[[0.0, 1.0]]]])
    # (|1-.5| + .05|0-.5| + |0-.5| + .05|1-.5|) / 2 = (0.525 + 0.525) / 2
    assert float(psdpm_consistency(baseline, fpem, proto)) == pytest.approx(0.525)


def test_extractor_is_the_official_multi_stage_cam():
    k, c2, c3, c4 = 2, 4, 5, 8
    official = OfficialPsdpmNet(c2, c3, c4, k + 1)
    ours, head = PsdpmModules((c2, c3, c4), k), nn.Conv2d(c4, k, 1, bias=False)
    copy_weights(official, ours, head)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 16, 16, generator=gen)
    x2, x3, x4 = (
        torch.randn(1, c2, 4, 4, generator=gen),
        torch.randn(1, c3, 2, 2, generator=gen),
        torch.randn(1, c4, 2, 2, generator=gen),
    )
    ones = torch.ones(1, k + 1, 2, 2)
    expected = official(image, x2, x3, x4, ones, torch.zeros(1, k + 1, 2, 2))["affsum"][:, 1:]

    class StagesModel(nn.Module):  # a classifier whose backbone returns the fixed maps above
        def __init__(self) -> None:
            super().__init__()
            self.head = head

    extractor = PsdpmCamExtractor(StagesModel(), ours, (-3, -2), scales=(1.0,), flip=False)
    import wsss_domains.methods.psdpm as psdpm

    original = psdpm.forward_with_stages
    psdpm.forward_with_stages = lambda model, batch, stages: {"cams": head(x4), "stage0": x2, "stage1": x3}
    try:
        got = extractor.raw_maps(image)
    finally:
        psdpm.forward_with_stages = original
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The method end to end.
# ---------------------------------------------------------------------------------------------


def test_training_steps_fill_the_class_memory_and_feed_it():
    method = create_method("psdpm")
    task, logged, initial = train_steps(method, steps=2)
    for name in ("cls", "gsc", "gsc_half"):
        assert np.isfinite(logged[f"train/{name}"]), name
    assert changed(task, initial, "psdpm")
    # Slots are the background (0) and the classes present in the stored image.
    assert method.memory and set(method.memory) <= {0, 1, 2}
    for slot, item in method.memory.items():
        assert item["valid"][slot] == 1
    task.model.train()
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    out = method.forward(task.model, task.method_modules, batch)
    assert out["all_logits"].shape[0] == 2 + len(method.memory) and out["logits"].shape == (2, 2)
    task.model.eval()
    assert method.forward(task.model, task.method_modules, batch)["all_logits"].shape[0] == 2
    no_memory = create_method("psdpm", class_memory=False)
    train_steps(no_memory, steps=1)
    assert not no_memory.memory


def test_bad_options_and_a_missing_baseline_fail_clearly(tmp_path: Path):
    with pytest.raises(MethodOptionError, match="'psdpm' has no option 'unknown'"):
        create_method("psdpm", unknown=1)
    with pytest.raises(ValueError, match="two indices"):
        create_method("psdpm", stages=[-2])
    with pytest.raises(UserError, match="cam-norm sigmoid"):
        PsdpmCamExtractor(nn.Module(), PsdpmModules((2, 3, 4), 1), (-3, -2), normalization="sigmoid")
    method = create_method("psdpm", baseline_run=str(tmp_path / "nowhere"))
    from wsss_domains.domains import create_domain

    with pytest.raises(UserError, match="baseline_run .*nowhere.* not a training run folder"):
        method.setup(create_domain("histo"), (0.5,) * 3, (0.5,) * 3)


def test_cli_baseline_run_then_psdpm_and_pseudo_labels(capsys, tmp_path: Path):
    baseline, _ = cli_train_and_pseudo_label(capsys, tmp_path / "baseline", "cam", steps=2)
    _, out = cli_train_and_pseudo_label(
        capsys, tmp_path / "psdpm", "psdpm", "--method-option", f"baseline_run={baseline}", steps=2
    )
    assert "pseudo-labels: 3 written" in out
    # The baseline's maps: its CAMs, each class over its maximum, background 1 - max first, resized.
    from wsss_domains.methods.psdpm import Baseline

    frozen = Baseline(baseline, torch.device("cpu"))
    image = torch.randn(2, 3, 32, 32)
    maps = frozen.maps(image, frozen.config.mean, frozen.config.std, (3, 5))
    cams = F.relu(frozen.model.cams(image, rectify=False))
    fg = cams / (cams.amax(dim=(2, 3), keepdim=True) + 1e-5)
    expected = torch.cat([1 - fg.amax(dim=1, keepdim=True), fg], dim=1)
    torch.testing.assert_close(maps, F.interpolate(expected, size=(3, 5), mode="bilinear"))
    with pytest.raises(UserError, match="baseline_run has 2 classes, this run 3"):
        frozen.check_classes(3)
