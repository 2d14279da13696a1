"""CPN against an independent transcription of the official code (Ferenas/CPN), then training.

The ``official_*`` functions below are copied from the official repository, with only the changes
needed to run them on CPU tensors (no ``.cuda()``) and to take as arguments what the official code
fixes for VOC (grid sizes in pixels, the class count), and never import the project's module:

* ``tool/imutils.py``: ``hide_patch`` (grid pairs), the part of ``hide_patch_ss`` after SLIC
  (superpixel pairs), ``max_onehot`` (over all channels);
* ``tool/visualization.py``: ``max_norm``; ``train_cpn.py``: ``adaptive_min_pooling_loss`` and one
  iteration's losses from the three views' ``(cam, cam_rv)``;
* ``network/da_atten.py``: ``SpatialGather_Module.forward``; ``network/resnet38_CPN.py``:
  ``Net.forward`` after ``fc8``, ``Net.PCM`` and ``Net.PRCM``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from method_training import changed, cli_train_and_pseudo_label, train_steps
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from cli_helpers import cli  # noqa: E402

import wsss_domains.training.fit  # noqa: E402, F401  (Lightning's log handler must see stderr first)
from wsss_domains.methods import create_method  # noqa: E402
from wsss_domains.methods.cpn import (  # noqa: E402
    Cpn,
    RegionCorrelationModule,
    cpn_losses,
    grid_sign,
    superpixel_sign,
)
from wsss_domains.methods.seam import PcmCamExtractor, PixelCorrelationModule  # noqa: E402
from wsss_domains.options import MethodOptionError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Transcription of the official code.
# ---------------------------------------------------------------------------------------------


def official_hide_patch(img: Tensor, grid_sizes: list[int]):
    """tool/imutils.py ``hide_patch`` (grid strategy); official ``grid_sizes = [224, 448]``."""
    s = img.shape
    wd = s[1]
    ht = s[2]
    uncontribute_num = 0
    contribute_num = 0
    sign = torch.ones(s)
    hide_prob = 0.5
    grid_size = grid_sizes[random.randint(0, len(grid_sizes) - 1)]
    if grid_size != 0:
        for x in range(0, wd, grid_size):
            for y in range(0, ht, grid_size):
                x_end = min(wd, x + grid_size)
                y_end = min(ht, y + grid_size)
                if random.random() <= hide_prob:
                    sign[:, x:x_end, y:y_end] = 0
                    uncontribute_num += 1
                else:
                    contribute_num += 1
    img1 = img * sign
    img2 = img * (1 - sign)
    contri_rate = contribute_num / (contribute_num + uncontribute_num)
    uncontri_rate = 1 - contri_rate
    return img1, img2, contri_rate, uncontri_rate


def official_hide_patch_ss(img: Tensor, spx: np.ndarray):
    """tool/imutils.py ``hide_patch_ss`` from its SLIC output ``spx`` on (``np.int`` is ``int`` now)."""
    _, w, h = img.shape
    uncontribute_num = 0
    contribute_num = 0
    sign = torch.ones(img.shape)
    patch_num = np.random.randint(0, np.max(spx) + 1, np.floor((np.max(spx) + 1) * 0.5).astype(int))
    dic = {}
    for num in patch_num:
        dic[num] = 0
    for i in range(w):
        for j in range(h):
            if spx[i, j] in dic:
                sign[:, i, j] = 0
                uncontribute_num += 1
            else:
                contribute_num += 1
    img1 = img * sign
    img2 = img * (1 - sign)
    contri_rate = contribute_num / (contribute_num + uncontribute_num)
    uncontri_rate = 1 - contri_rate
    return img1, img2, contri_rate, uncontri_rate


def official_max_onehot(x: Tensor) -> Tensor:
    """tool/imutils.py ``max_onehot`` (CPN's: over all channels, in place)."""
    n, c, h, w = x.size()
    x_max = torch.max(x, dim=1, keepdim=True)[0]
    x[x != x_max] = 0
    return x


def official_max_norm(p: Tensor, e: float = 1e-5) -> Tensor:
    """tool/visualization.py ``max_norm(p, version='torch')``, ``p.dim() == 4``."""
    N, C, H, W = p.size()
    p = F.relu(p)
    max_v = torch.max(p.view(N, C, -1), dim=-1)[0].view(N, C, 1, 1)
    min_v = torch.min(p.view(N, C, -1), dim=-1)[0].view(N, C, 1, 1)
    p = F.relu(p - min_v - e) / (max_v - min_v + e)
    return p


def official_adaptive_min_pooling_loss(x: Tensor) -> Tensor:
    """train_cpn.py ``adaptive_min_pooling_loss``."""
    n, c, h, w = x.size()
    k = h * w // 4
    x = torch.max(x, dim=1)[0]
    y = torch.topk(x.view(n, -1), k=k, dim=-1, largest=False)[0]
    y = F.relu(y, inplace=False)
    loss = torch.sum(y) / (k * n)
    return loss


def official_iteration(
    views: list[tuple[Tensor, Tensor]], pack_label: Tensor, rate: Tensor
) -> dict[str, Tensor]:
    """train_cpn.py's loop body from the three ``model(img)``, ``model(img1)``, ``model(img2)`` outputs
    (``(cam, cam_rv)``, ``K+1`` channels at the input size) to ``loss``; ``rate`` = ``pack[5]``."""
    N = pack_label.shape[0]
    K1 = pack_label.shape[1] + 1  # 21 in the official code (VOC)
    label = pack_label
    bg_score = torch.ones((N, 1))
    label = torch.cat((bg_score, label), dim=1)
    label = label.unsqueeze(2).unsqueeze(3)
    ctri = rate.view(N, 1, 1, 1).repeat(1, K1, 1, 1).type(torch.FloatTensor)
    uctri = (1 - rate).view(N, 1, 1, 1).repeat(1, K1, 1, 1).type(torch.FloatTensor)

    cam, cam_improved = views[0]
    l = F.adaptive_avg_pool2d(cam, (1, 1))  # noqa: E741 - the official name
    loss_rvmin = official_adaptive_min_pooling_loss((cam_improved * label)[:, 1:, :, :])
    cam = official_max_norm(cam) * label
    cam_improved = official_max_norm(cam_improved) * label

    cam1, cam_improved1 = views[1]
    l1 = F.adaptive_avg_pool2d(cam1, (1, 1))
    loss_rvmin1 = official_adaptive_min_pooling_loss((cam_improved1 * label)[:, 1:, :, :])
    cam1 = ctri * official_max_norm(cam1) * label
    cam_improved1 = ctri * official_max_norm(cam_improved1) * label

    cam2, cam_improved2 = views[2]
    l2 = F.adaptive_avg_pool2d(cam2, (1, 1))
    loss_rvmin2 = official_adaptive_min_pooling_loss((cam_improved2 * label)[:, 1:, :, :])
    cam2 = uctri * official_max_norm(cam2) * label
    cam_improved2 = uctri * official_max_norm(cam_improved2) * label

    loss_cls = F.multilabel_soft_margin_loss(l[:, 1:, :, :], label[:, 1:, :, :])
    loss_cls1 = F.multilabel_soft_margin_loss(l1[:, 1:, :, :], label[:, 1:, :, :])
    loss_cls2 = F.multilabel_soft_margin_loss(l2[:, 1:, :, :], label[:, 1:, :, :])
    cls = (loss_cls + loss_cls1 + loss_cls2) / 3
    rvmin = (loss_rvmin + loss_rvmin1 + loss_rvmin2) / 3
    loss_cls = cls + rvmin

    loss_tcp = torch.mean(
        torch.abs((cam2[:, 1:, :, :].detach() + cam1[:, 1:, :, :].detach()) - cam[:, 1:, :, :])
    )
    loss_tcp_improved = torch.mean(
        torch.abs(cam_improved[:, 1:, :, :] - cam_improved1[:, 1:, :, :] - cam_improved2[:, 1:, :, :])
    )
    loss_tcp_all = loss_tcp + loss_tcp_improved

    ns, cs, hs, ws = cam.size()
    cam[:, 0, :, :] = 1 - torch.max(cam[:, 1:, :, :], dim=1)[0]
    cam1[:, 0, :, :] = 1 - torch.max(cam1[:, 1:, :, :], dim=1)[0]
    cam2[:, 0, :, :] = 1 - torch.max(cam2[:, 1:, :, :], dim=1)[0]
    cam_improved[:, 0, :, :] = 1 - torch.max(cam_improved[:, 1:, :, :], dim=1)[0]
    cam_improved1[:, 0, :, :] = 1 - torch.max(cam_improved1[:, 1:, :, :], dim=1)[0]
    cam_improved2[:, 0, :, :] = 1 - torch.max(cam_improved2[:, 1:, :, :], dim=1)[0]
    loss_cpcr1 = torch.abs(official_max_onehot(cam.detach() - cam1.detach()) - cam_improved2)
    loss_cpcr2 = torch.abs(official_max_onehot(cam.detach() - cam2.detach()) - cam_improved1)
    loss_cpcr1_ohem = torch.mean(torch.topk(loss_cpcr1.view(ns, -1), k=(int)(K1 * hs * ws * 0.2), dim=-1)[0])
    loss_cpcr2_ohem = torch.mean(torch.topk(loss_cpcr2.view(ns, -1), k=(int)(K1 * hs * ws * 0.2), dim=-1)[0])
    loss_cpcr = loss_cpcr1_ohem + loss_cpcr2_ohem

    loss = loss_cls + loss_tcp_all + loss_cpcr
    return {
        "cls": cls,
        "rvmin": rvmin,
        "tcp": loss_tcp,
        "tcp_rv": loss_tcp_improved,
        "cpcr": loss_cpcr,
        "loss": loss,
    }


class OfficialSpatialGather(nn.Module):
    """network/da_atten.py ``SpatialGather_Module`` (``cls_num=0, scale=1``; it has no weights)."""

    def __init__(self, cls_num: int = 0, scale: int = 1) -> None:
        super().__init__()
        self.cls_num = cls_num
        self.scale = scale

    def forward(self, feats: Tensor, probs: Tensor) -> Tensor:
        _, _, H, W = feats.size()
        probs = F.interpolate(probs, (H, W), mode="bilinear", align_corners=True)
        batch_size, c, h, w = probs.size(0), probs.size(1), probs.size(2), probs.size(3)  # noqa: F841
        probs = probs.view(batch_size, c, -1)
        feats = feats.view(batch_size, feats.size(1), -1)
        feats = feats.permute(0, 2, 1)  # batch x hw x c
        probs = F.softmax(self.scale * probs, dim=2)  # batch x k x hw
        ocr_context = torch.matmul(probs, feats).permute(0, 2, 1).unsqueeze(3)  # batch x k x c
        return ocr_context


class OfficialCpnHead(nn.Module):
    """network/resnet38_CPN.py ``Net.forward`` from the ``fc8`` output on, ``Net.PCM`` and ``Net.PRCM``;
    ``f8_3``/``f8_4`` take the given stages' widths, the literal 21 is the class count ``K+1``."""

    def __init__(self, c4: int, c5: int, k1: int) -> None:
        super().__init__()
        self.k1 = k1
        self.f8_3 = torch.nn.Conv2d(c4, 64, 1, bias=False)
        self.f8_4 = torch.nn.Conv2d(c5, 128, 1, bias=False)
        self.f9 = torch.nn.Conv2d(192 + 3, 192, 1, bias=False)
        self.f10 = torch.nn.Conv2d(192 + 3, 192, 1, bias=False)
        self.spatial_gather = OfficialSpatialGather()

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

        f8_33 = d["conv4"]
        f8_44 = d["conv5"]
        f8_3 = F.relu(self.f8_3(f8_33.detach()), inplace=True)
        f8_4 = F.relu(self.f8_4(f8_44.detach()), inplace=True)
        x_s = F.interpolate(x, (h, w), mode="bilinear", align_corners=True)
        f = torch.cat([x_s, f8_3, f8_4], dim=1)

        fea_p = self.PRCM(self.spatial_gather(f, cam_d_norm), f)
        fea_final = self.PCM(cam_d_norm, f) + fea_p * cam_d_norm

        cam_rv = F.interpolate(fea_final, (H, W), mode="bilinear", align_corners=True)
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

    def PRCM(self, cam: Tensor, f: Tensor) -> Tensor:  # noqa: N802 - the official name
        n, c, h, w = f.size()
        f = F.relu(self.f9(f))
        f = f.view(n, -1, h * w)
        key = F.relu(self.f10(cam)).view(n, self.k1, -1)
        sim_map = torch.matmul(key, f)
        sim_map = (self.k1**-0.5) * sim_map
        cam_rv = F.softmax(sim_map, dim=-1).view(n, -1, h, w)
        return cam_rv


# ---------------------------------------------------------------------------------------------
# Complementary pairs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "grid_sizes"), [((64, 64), [32, 64]), ((50, 70), [35, 70]), ((40, 24), [7])]
)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_grid_pairs_match_official_hide_patch(size, grid_sizes, seed):
    h, w = size
    image = torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))
    random.seed(seed)
    img1, img2, ctri, uctri = official_hide_patch(image, grid_sizes)
    sign, share = grid_sign(h, w, grid_sizes, 0.5, random.Random(seed))
    torch.testing.assert_close(image * sign, img1)
    torch.testing.assert_close(image * (1 - sign), img2)
    assert share == pytest.approx(ctri) and 1 - share == pytest.approx(uctri)
    # The pair partitions the image: 0/1 masks, mask + complement = 1, the copies add up to it.
    assert set(sign.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(img1 + img2, image)


def test_grid_cells_are_whole_and_about_half_are_hidden():
    rng = random.Random(3)
    hidden, cells = 0, 0
    for _ in range(200):
        sign, share = grid_sign(64, 64, [16], 0.5, rng)
        blocks = sign.view(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(16, -1)
        assert torch.equal(blocks.amin(dim=1), blocks.amax(dim=1))  # each 16x16 cell is all 0 or all 1
        assert share == pytest.approx(float(blocks[:, 0].mean()))
        hidden += int((blocks[:, 0] == 0).sum())
        cells += 16
    assert hidden / cells == pytest.approx(0.5, abs=0.03)


def test_cpn_draws_per_image_pairs_with_the_official_grid_sizes():
    method = create_method("cpn")
    assert method.grid_sizes == (0.5, 1.0)  # 224 and 448 pixels of the official 448 crop
    images = torch.randn(6, 3, 48, 40)
    sign, ctri = method.signs(images, seed=5)
    assert sign.shape == (6, 1, 48, 40) and ctri.shape == (6,)
    # Cells of 24 or 48 pixels (x 0.5 or x 1.0 the longer side), a grid drawn per image.
    rng = random.Random(5)
    for i in range(6):
        expected, share = grid_sign(48, 40, [24, 48], 0.5, rng)
        torch.testing.assert_close(sign[i, 0], expected)
        assert float(ctri[i]) == pytest.approx(share)
    torch.testing.assert_close(method.signs(images, seed=5)[0], sign)  # seeded
    assert not torch.equal(method.signs(images, seed=6)[0], sign)


@pytest.mark.parametrize("seed", [0, 4])
def test_superpixel_pairs_match_official_hide_patch_ss(seed):
    segments = np.random.RandomState(100 + seed).randint(1, 31, size=(20, 24))  # ids 1..30, as SLIC's
    image = torch.randn(3, 20, 24)
    np.random.seed(seed)
    img1, img2, ctri, _ = official_hide_patch_ss(image, segments)
    sign, share = superpixel_sign(segments, 0.5, np.random.RandomState(seed))
    torch.testing.assert_close(image * sign, img1)
    torch.testing.assert_close(image * (1 - sign), img2)
    assert share == pytest.approx(ctri)
    # Whole superpixels are hidden or shown.
    for label in np.unique(segments):
        assert len(sign[torch.from_numpy(segments == label)].unique()) == 1


def test_superpixel_strategy_with_scikit_image():
    pytest.importorskip("skimage")
    method = create_method("cpn", strategy="superpixel", superpixels=20)
    sign, ctri = method.signs(torch.randn(2, 3, 32, 32), seed=0)
    assert sign.shape == (2, 1, 32, 32) and 0 <= float(ctri.min()) and float(ctri.max()) <= 1


# ---------------------------------------------------------------------------------------------
# Refined maps and losses against the transcription.
# ---------------------------------------------------------------------------------------------

# (batch, classes, image H, W, feature h, w)
CASES = [(2, 3, 32, 40, 4, 5), (1, 20, 24, 24, 6, 6), (3, 1, 16, 20, 4, 5)]


@pytest.mark.parametrize("case", CASES)
def test_refined_maps_match_official_forward(case):
    n, k, h, w, fh, fw = case
    gen = torch.Generator().manual_seed(k)
    ours = RegionCorrelationModule(7, 9)
    official = OfficialCpnHead(7, 9, k + 1)
    official.f8_3.weight.data.copy_(ours.low.weight.data)
    official.f8_4.weight.data.copy_(ours.mid.weight.data)
    official.f9.weight.data.copy_(ours.embed.weight.data)
    official.f10.weight.data.copy_(ours.key.weight.data)
    image = torch.randn(n, 3, h, w, generator=gen)
    fc8 = torch.randn(n, k + 1, fh, fw, generator=gen)  # the official background channel is random
    conv4, conv5 = torch.randn(n, 7, fh, fw, generator=gen), torch.randn(n, 9, fh, fw, generator=gen)
    cam, cam_rv = official(image, fc8, conv4, conv5)
    refined = ours(fc8[:, 1:], image, conv4, conv5)
    up = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=True)
    torch.testing.assert_close(up, cam_rv, rtol=1e-5, atol=1e-6)
    # The PRCM term matters: SEAM's PCM alone (same weights) gives other maps.
    seam_only = PixelCorrelationModule.forward(ours, fc8[:, 1:], image, conv4, conv5)
    assert float((seam_only - refined).detach().abs().max()) > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_losses_and_gradients_match_official_iteration(case):
    n, k, h, w, _, _ = case
    gen = torch.Generator().manual_seed(10 + k)
    labels = (torch.rand(n, k, generator=gen) < 0.5).float()
    labels[:, 0] = 1
    rate = torch.rand(n, generator=gen)
    raw = [
        (torch.randn(n, k + 1, h, w, generator=gen), torch.randn(n, k + 1, h, w, generator=gen))
        for _ in range(3)
    ]

    official_in = [(c.clone().requires_grad_(), r.clone().requires_grad_()) for c, r in raw]
    expected = official_iteration(official_in, labels, rate)
    expected["loss"].backward()

    cams = [c[:, 1:].clone().requires_grad_() for c, _ in raw]
    refined = [r.clone().requires_grad_() for _, r in raw]
    losses = cpn_losses(cams, refined, rate, labels, 0.2)
    cls = sum(F.binary_cross_entropy_with_logits(c.mean(dim=(2, 3)), labels) for c in cams) / 3
    total = cls + sum(losses.values())
    total.backward()

    assert cls.item() == pytest.approx(expected["cls"].item(), rel=1e-5)
    for name in ("rvmin", "tcp", "tcp_rv", "cpcr"):
        assert losses[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-7), name
    assert total.item() == pytest.approx(expected["loss"].item(), rel=1e-5)
    for (oc, orv), c, r in zip(official_in, cams, refined, strict=True):
        torch.testing.assert_close(c.grad, oc.grad[:, 1:], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r.grad, orv.grad, rtol=1e-4, atol=1e-7)
        assert float(oc.grad[:, 0].abs().max()) == 0.0  # the official fc8 background gets no gradient


def test_tcp_is_zero_when_the_copies_add_up_to_the_image():
    # One class, C_1 + C_2 = C_0 exactly: the copies' normalised CAMs are C_0 / share each.
    cam = torch.tensor([[[[0.0, 1.0, 2.0, 4.0]]]])
    rate = torch.tensor([0.25])
    refined = [torch.zeros(1, 2, 1, 4)] * 3
    losses = cpn_losses([cam, cam, cam], refined, rate, torch.ones(1, 1), 0.2)
    assert float(losses["tcp"]) == pytest.approx(0.0, abs=1e-6)
    half = cpn_losses([cam, cam, torch.zeros_like(cam)], refined, rate, torch.ones(1, 1), 0.2)
    norm = [max(v - 1e-5, 0) / (4 + 1e-5) for v in (0, 1, 2, 4)]
    assert float(half["tcp"]) == pytest.approx(sum(0.75 * v for v in norm) / 4, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The method end to end.
# ---------------------------------------------------------------------------------------------


def test_two_training_steps_and_refined_extractor():
    method = create_method("cpn")
    task, logged, initial = train_steps(method)
    for name in ("cls_loss", "cls_copies", "rvmin", "tcp", "tcp_rv", "cpcr"):
        assert f"train/{name}" in logged and np.isfinite(logged[f"train/{name}"]), name
    assert changed(task, initial, "pcm")
    assert any(k.startswith("pcm.key.") for k in initial)  # the PRCM's f10 trains with the PCM
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0, 0.5))
    assert isinstance(extractor, PcmCamExtractor) and extractor.subtract_minimum  # infer_cam.py
    cams = extractor(torch.randn(3, 40, 48))
    assert cams.shape == (2, 40, 48)
    # min-max: the peak is (max - min - 1e-5) / (max - min + 1e-5), just under 1
    assert float(cams.min()) == 0 and float(cams.max()) == pytest.approx(1.0, abs=1e-3)


def test_cpn_rejects_bad_options():
    assert Cpn.classification_weight == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        create_method("cpn", grid_sizes=[1.5])
    with pytest.raises(MethodOptionError, match="'cpn': option 'strategy'"):
        create_method("cpn", strategy="checkerboard")
    with pytest.raises(MethodOptionError, match="'cpn' has no option 'unknown'.*strategy"):
        create_method("cpn", unknown=1)


def test_listed_trained_and_pseudo_labelling(capsys, tmp_path: Path):
    code, out, _ = cli(capsys, "methods")
    assert code == 0 and "cpn" in out
    _, out = cli_train_and_pseudo_label(capsys, tmp_path, "cpn", steps=2)
    assert "pseudo-labels: 3 written" in out
    assert len(list((tmp_path / "pl").glob("*.png"))) == 3
