"""SEAM against an independent transcription of the official code (YudeWang/SEAM).

The ``official_*`` functions below are copied from the official repository, with only the changes
needed to run them on CPU tensors (no ``.cuda()``, no ``DataParallel``), and never import the
project's module:

* ``tool/visualization.py``: ``max_norm`` (the 4-d torch branch);
* ``network/resnet38_SEAM.py``: ``Net.forward`` after ``fc8`` (the PCM input ``cam_d_norm``, the
  PCM features from ``conv4``/``conv5`` and the image) and ``Net.PCM``;
* ``train_SEAM.py``: ``adaptive_min_pooling_loss``, ``max_onehot`` and one training iteration's
  losses (classification, ``loss_rvmin``, ER, ECR with its top-k).

The project's functions are fed the same fixed random inputs (several sizes and class counts) and
must give the same values and gradients. The official network has a background channel in ``fc8``;
it is given random values here, which must not matter (it is overwritten before every use).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.methods import create_method
from wsss_domains.methods.seam import (
    PixelCorrelationModule,
    SeamViews,
    adaptive_min_pooling_loss,
    max_norm,
    max_onehot,
    pcm_seeds,
)
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.models.stages import forward_with_stages

# ---------------------------------------------------------------------------------------------
# Transcription of the official code.
# ---------------------------------------------------------------------------------------------


def official_max_norm(p: Tensor, e: float = 1e-5) -> Tensor:
    """tool/visualization.py ``max_norm(p, version='torch')``, ``p.dim() == 4``."""
    N, C, H, W = p.size()
    p = F.relu(p)
    max_v = torch.max(p.view(N, C, -1), dim=-1)[0].view(N, C, 1, 1)
    min_v = torch.min(p.view(N, C, -1), dim=-1)[0].view(N, C, 1, 1)
    p = F.relu(p - min_v - e) / (max_v - min_v + e)
    return p


def official_adaptive_min_pooling_loss(x: Tensor) -> Tensor:
    """train_SEAM.py ``adaptive_min_pooling_loss``."""
    n, c, h, w = x.size()
    k = h * w // 4
    x = torch.max(x, dim=1)[0]
    y = torch.topk(x.view(n, -1), k=k, dim=-1, largest=False)[0]
    y = F.relu(y, inplace=False)
    loss = torch.sum(y) / (k * n)
    return loss


def official_max_onehot(x: Tensor) -> Tensor:
    """train_SEAM.py ``max_onehot`` (in place on its argument, as the official code)."""
    n, c, h, w = x.size()
    x_max = torch.max(x[:, 1:, :, :], dim=1, keepdim=True)[0]
    x[:, 1:, :, :][x[:, 1:, :, :] != x_max] = 0
    return x


class OfficialSeamHead(nn.Module):
    """network/resnet38_SEAM.py ``Net.forward`` from the ``fc8`` output on, and ``Net.PCM``.

    ``f8_3``/``f8_4``/``f9`` have the official shapes but the input widths of the given stages.
    """

    def __init__(self, c4: int, c5: int) -> None:
        super().__init__()
        self.f8_3 = torch.nn.Conv2d(c4, 64, 1, bias=False)
        self.f8_4 = torch.nn.Conv2d(c5, 128, 1, bias=False)
        self.f9 = torch.nn.Conv2d(192 + 3, 192, 1, bias=False)

    def forward(self, x: Tensor, cam: Tensor, conv4: Tensor, conv5: Tensor) -> tuple[Tensor, Tensor]:
        N, C, H, W = x.size()
        d = {"conv4": conv4, "conv5": conv5}
        n, c, h, w = cam.size()
        with torch.no_grad():
            cam_d = F.relu(cam.detach())
            cam_d_max = torch.max(cam_d.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1) + 1e-5
            cam_d_norm = F.relu(cam_d - 1e-5) / cam_d_max
            cam_d_norm[:, 0, :, :] = 1 - torch.max(cam_d_norm[:, 1:, :, :], dim=1)[0]
            cam_max = torch.max(cam_d_norm[:, 1:, :, :], dim=1, keepdim=True)[0]
            cam_d_norm[:, 1:, :, :][cam_d_norm[:, 1:, :, :] < cam_max] = 0

        f8_3 = F.relu(self.f8_3(d["conv4"].detach()), inplace=True)
        f8_4 = F.relu(self.f8_4(d["conv5"].detach()), inplace=True)
        x_s = F.interpolate(x, (h, w), mode="bilinear", align_corners=True)
        f = torch.cat([x_s, f8_3, f8_4], dim=1)
        n, c, h, w = f.size()

        cam_rv = F.interpolate(self.PCM(cam_d_norm, f), (H, W), mode="bilinear", align_corners=True)
        cam = F.interpolate(cam, (H, W), mode="bilinear", align_corners=True)
        return cam, cam_rv

    def PCM(self, cam: Tensor, f: Tensor) -> Tensor:  # noqa: N802 - the official name
        n, c, h, w = f.size()
        cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=True).view(n, -1, h * w)
        f = self.f9(f)
        f = f.view(n, -1, h * w)
        f = f / (torch.norm(f, dim=1, keepdim=True) + 1e-5)

        aff = F.relu(torch.matmul(f.transpose(1, 2), f), inplace=True)
        aff = aff / (torch.sum(aff, dim=1, keepdim=True) + 1e-5)
        cam_rv = torch.matmul(cam, aff).view(n, -1, h, w)

        return cam_rv


def official_iteration(
    model: OfficialSeamHead,
    img1: Tensor,
    pack_label: Tensor,
    forward1: tuple[Tensor, Tensor, Tensor],
    forward2: tuple[Tensor, Tensor, Tensor],
) -> dict[str, Tensor]:
    """train_SEAM.py's loop body up to ``loss``. ``forwardN`` = (fc8 output, conv4, conv5) of view N."""
    scale_factor = 0.3
    img2 = F.interpolate(img1, scale_factor=scale_factor, mode="bilinear", align_corners=True)
    N, C, H, W = img1.size()
    label = pack_label
    bg_score = torch.ones((N, 1))
    label = torch.cat((bg_score, label), dim=1)
    label = label.unsqueeze(2).unsqueeze(3)
    K1 = label.shape[1]  # 21 in the official code (VOC)

    cam1, cam_rv1 = model(img1, *forward1)
    label1 = F.adaptive_avg_pool2d(cam1, (1, 1))
    loss_rvmin1 = official_adaptive_min_pooling_loss((cam_rv1 * label)[:, 1:, :, :])
    cam1 = (
        F.interpolate(official_max_norm(cam1), scale_factor=scale_factor, mode="bilinear", align_corners=True)
        * label
    )
    cam_rv1 = (
        F.interpolate(
            official_max_norm(cam_rv1), scale_factor=scale_factor, mode="bilinear", align_corners=True
        )
        * label
    )

    cam2, cam_rv2 = model(img2, *forward2)
    label2 = F.adaptive_avg_pool2d(cam2, (1, 1))
    loss_rvmin2 = official_adaptive_min_pooling_loss((cam_rv2 * label)[:, 1:, :, :])
    cam2 = official_max_norm(cam2) * label
    cam_rv2 = official_max_norm(cam_rv2) * label

    loss_cls1 = F.multilabel_soft_margin_loss(label1[:, 1:, :, :], label[:, 1:, :, :])
    loss_cls2 = F.multilabel_soft_margin_loss(label2[:, 1:, :, :], label[:, 1:, :, :])

    ns, cs, hs, ws = cam2.size()
    loss_er = torch.mean(torch.abs(cam1[:, 1:, :, :] - cam2[:, 1:, :, :]))
    cam1[:, 0, :, :] = 1 - torch.max(cam1[:, 1:, :, :], dim=1)[0]
    cam2[:, 0, :, :] = 1 - torch.max(cam2[:, 1:, :, :], dim=1)[0]
    tensor_ecr1 = torch.abs(official_max_onehot(cam2.detach().clone()) - cam_rv1)
    tensor_ecr2 = torch.abs(official_max_onehot(cam1.detach().clone()) - cam_rv2)
    loss_ecr1 = torch.mean(torch.topk(tensor_ecr1.view(ns, -1), k=(int)(K1 * hs * ws * 0.2), dim=-1)[0])
    loss_ecr2 = torch.mean(torch.topk(tensor_ecr2.view(ns, -1), k=(int)(K1 * hs * ws * 0.2), dim=-1)[0])
    loss_ecr = loss_ecr1 + loss_ecr2

    loss_cls = (loss_cls1 + loss_cls2) / 2 + (loss_rvmin1 + loss_rvmin2) / 2
    return {
        "cls1": loss_cls1,
        "cls2": loss_cls2,
        "rvmin": (loss_rvmin1 + loss_rvmin2) / 2,
        "er": loss_er,
        "ecr": loss_ecr,
        "loss": loss_cls + loss_er + loss_ecr,
        "img2": img2,
    }


# ---------------------------------------------------------------------------------------------
# Fixed inputs.
# ---------------------------------------------------------------------------------------------

# (batch, classes, image H, W, feature stride): sizes whose x0.3 view has a non-trivial feature map.
CASES = [(2, 3, 64, 80, 8), (1, 5, 96, 64, 8), (3, 1, 56, 56, 4), (2, 20, 48, 72, 8)]


def _inputs(case: tuple[int, int, int, int, int], seed: int) -> dict[str, Tensor]:
    n, k, h, w, stride = case
    gen = torch.Generator().manual_seed(seed)
    img1 = torch.randn(n, 3, h, w, generator=gen)
    h2, w2 = int(h * 0.3), int(w * 0.3)
    fh1, fw1 = -(-h // stride), -(-w // stride)
    fh2, fw2 = -(-h2 // stride), -(-w2 // stride)
    labels = (torch.rand(n, k, generator=gen) < 0.5).float()
    labels[:, 0] = 1  # at least one present class per image
    return {
        "img1": img1,
        "labels": labels,
        # fc8 outputs with their background channel first (K + 1 channels), then conv4 / conv5.
        "cam1": torch.randn(n, k + 1, fh1, fw1, generator=gen) * 2,
        "cam2": torch.randn(n, k + 1, fh2, fw2, generator=gen) * 2,
        "conv4_1": torch.randn(n, 6, fh1, fw1, generator=gen),
        "conv5_1": torch.randn(n, 7, fh1, fw1, generator=gen),
        "conv4_2": torch.randn(n, 6, fh2, fw2, generator=gen),
        "conv5_2": torch.randn(n, 7, fh2, fw2, generator=gen),
    }


def _pcm_pair(seed: int) -> tuple[OfficialSeamHead, PixelCorrelationModule]:
    torch.manual_seed(seed)
    official = OfficialSeamHead(6, 7)
    ours = PixelCorrelationModule(6, 7)
    ours.low.weight.data.copy_(official.f8_3.weight.data)
    ours.mid.weight.data.copy_(official.f8_4.weight.data)
    ours.embed.weight.data.copy_(official.f9.weight.data)
    return official, ours


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (1, 21, 5, 5), (3, 1, 12, 3)])
def test_elementwise_functions_match_the_official(shape: tuple[int, int, int, int]):
    gen = torch.Generator().manual_seed(sum(shape))
    maps = torch.randn(*shape, generator=gen) * 3
    maps[0, 0, 0, 0] = maps[0, 0].max()  # a tie at the maximum
    torch.testing.assert_close(max_norm(maps), official_max_norm(maps.clone()))
    torch.testing.assert_close(
        adaptive_min_pooling_loss(maps), official_adaptive_min_pooling_loss(maps.clone())
    )
    if shape[1] > 1:
        ties = maps.round()  # integer maps: ties between classes are common
        torch.testing.assert_close(max_onehot(ties), official_max_onehot(ties.clone()))
        torch.testing.assert_close(max_onehot(maps), official_max_onehot(maps.clone()))


@pytest.mark.parametrize("case", CASES)
def test_pcm_seeds_and_pcm_match_the_official_network(case):
    x = _inputs(case, seed=1)
    official, ours = _pcm_pair(seed=2)
    n, k, h, w, _ = case
    cam21 = x["cam1"]
    with torch.no_grad():
        # The official PCM input, from the fc8 output with a background channel.
        c = cam21.shape[1]
        cam_d = F.relu(cam21)
        cam_d_norm = F.relu(cam_d - 1e-5) / (
            torch.max(cam_d.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1) + 1e-5
        )
        cam_d_norm[:, 0] = 1 - torch.max(cam_d_norm[:, 1:], dim=1)[0]
        cam_max = torch.max(cam_d_norm[:, 1:], dim=1, keepdim=True)[0]
        cam_d_norm[:, 1:][cam_d_norm[:, 1:] < cam_max] = 0
    torch.testing.assert_close(pcm_seeds(cam21[:, 1:]), cam_d_norm)

    _, official_rv = official(x["img1"], cam21, x["conv4_1"], x["conv5_1"])
    ours_rv = ours(cam21[:, 1:], x["img1"], x["conv4_1"], x["conv5_1"])
    ours_rv = F.interpolate(ours_rv, size=(h, w), mode="bilinear", align_corners=True)
    torch.testing.assert_close(ours_rv, official_rv, rtol=1e-4, atol=1e-6)


def _project_losses(x: dict[str, Tensor], ours: PixelCorrelationModule, cam1: Tensor, cam2: Tensor):
    """The project's SEAM losses for the same two views (fc8 foreground channels only)."""
    img1 = x["img1"]
    img2 = F.interpolate(img1, scale_factor=0.3, mode="bilinear", align_corners=True)

    def outputs(cams: Tensor, image: Tensor, conv4: Tensor, conv5: Tensor) -> dict[str, Tensor]:
        # logits: the official classification input, GAP of the CAM upsampled to the image size
        up = F.interpolate(cams, size=image.shape[-2:], mode="bilinear", align_corners=True)
        return {"cams": cams, "logits": up.mean(dim=(2, 3)), "stage0": conv4, "stage1": conv5}

    out1 = outputs(cam1[:, 1:], img1, x["conv4_1"], x["conv5_1"])
    out2 = outputs(cam2[:, 1:], img2, x["conv4_2"], x["conv5_2"])
    views = SeamViews(
        image=img1,
        scaled_image=img2,
        outputs=out1,
        scaled_outputs=out2,
        pcm=ours(out1["cams"], img1, out1["stage0"], out1["stage1"]),
        scaled_pcm=ours(out2["cams"], img2, out2["stage0"], out2["stage1"]),
    )
    method = create_method("seam")
    losses = method.seam_losses(views, x["labels"])
    cls1 = F.binary_cross_entropy_with_logits(out1["logits"], x["labels"])
    total = method.classification_weight * cls1 + sum(losses.values())
    return losses, cls1, total


@pytest.mark.parametrize("case", CASES)
def test_training_losses_and_gradients_match_the_official_iteration(case):
    x = _inputs(case, seed=3)
    for name in ("conv4_1", "conv5_1", "conv4_2", "conv5_2"):
        x[name].requires_grad_()  # both codes detach the stages the PCM reads
    official, ours = _pcm_pair(seed=4)
    cam1_a, cam2_a = x["cam1"].clone().requires_grad_(), x["cam2"].clone().requires_grad_()
    ref = official_iteration(
        official,
        x["img1"],
        x["labels"],
        (cam1_a, x["conv4_1"], x["conv5_1"]),
        (cam2_a, x["conv4_2"], x["conv5_2"]),
    )
    assert ref["img2"].shape[-2:] == (int(case[2] * 0.3), int(case[3] * 0.3))

    cam1_b, cam2_b = x["cam1"].clone().requires_grad_(), x["cam2"].clone().requires_grad_()
    losses, cls1, total = _project_losses(x, ours, cam1_b, cam2_b)

    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(losses["er"], ref["er"], **tol)
    torch.testing.assert_close(losses["ecr"], ref["ecr"], **tol)
    torch.testing.assert_close(losses["rvmin"], ref["rvmin"], **tol)
    torch.testing.assert_close(cls1, ref["cls1"], **tol)
    torch.testing.assert_close(losses["cls_scaled"], ref["cls2"] / 2, **tol)
    torch.testing.assert_close(total, ref["loss"], **tol)

    # Same gradients for the CAMs (the background channel gets none) and for the PCM's convolutions:
    # what the official code detaches is detached here too.
    ref["loss"].backward()
    total.backward()
    for a, b in ((cam1_a, cam1_b), (cam2_a, cam2_b)):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad[:, 0], torch.zeros_like(a.grad[:, 0]))
        torch.testing.assert_close(b.grad[:, 1:], a.grad[:, 1:], rtol=1e-4, atol=1e-7)
    for a, b in ((official.f8_3, ours.low), (official.f8_4, ours.mid), (official.f9, ours.embed)):
        torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=1e-4, atol=1e-7)
    assert all(x[name].grad is None for name in ("conv4_1", "conv5_1", "conv4_2", "conv5_2"))


def test_the_methods_training_pass_matches_the_official_iteration_on_a_real_model():
    """Seam.forward + training_losses on a timm model (x0.3 view, stages, PCM) vs the official loop."""
    torch.manual_seed(5)
    model = CamClassifier(num_classes=3, backbone="test_efficientnet", weights="random").eval()
    # Stages -2/-1 share the CAM's stride here, as conv4/conv5 and fc8 do in the official ResNet-38.
    method = create_method("seam", pcm_stages=[-2, -1])
    modules = method.build_modules(model)
    img1 = torch.randn(2, 3, 96, 112)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    batch = {"image": img1, "label": labels}
    outputs = method.forward(model, modules, batch)
    losses = method.training_losses(model, modules, batch, outputs)

    pcm = modules["pcm"]
    official = OfficialSeamHead(pcm.low.in_channels, pcm.mid.in_channels)
    official.f8_3.weight.data.copy_(pcm.low.weight.data)
    official.f8_4.weight.data.copy_(pcm.mid.weight.data)
    official.f9.weight.data.copy_(pcm.embed.weight.data)

    def fc8(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = forward_with_stages(model, image, method.pcm_stages)
        cams = torch.cat([torch.zeros_like(out["cams"][:, :1]), out["cams"]], dim=1)
        return cams, out["stage0"], out["stage1"]

    img2 = F.interpolate(img1, scale_factor=0.3, mode="bilinear", align_corners=True)
    ref = official_iteration(official, img1, labels, fc8(img1), fc8(img2))
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for name in ("er", "ecr", "rvmin"):
        torch.testing.assert_close(losses[name], ref[name], **tol)
    # The classification scores: GAP of the CAMs upsampled to each view's input, as the official net.
    cls1 = F.binary_cross_entropy_with_logits(outputs["logits"], labels)
    torch.testing.assert_close(cls1, ref["cls1"], **tol)
    torch.testing.assert_close(losses["cls_scaled"], ref["cls2"] / 2, **tol)
    total = method.classification_weight * cls1 + sum(losses.values())
    torch.testing.assert_close(total, ref["loss"], **tol)
