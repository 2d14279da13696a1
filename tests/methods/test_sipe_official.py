"""SIPE against an independent transcription of the official code (chenqi1126/SIPE).

The ``official_*`` functions and :class:`OfficialSipeHead` below are copied from the official
repository, with only the changes needed to run them on CPU tensors (``.cuda()`` dropped) and with
the backbone stages passed in, and never import the project's module:

* ``network/resnet50_SIPE.py``: ``Net.get_seed``, ``Net.get_prototype``, ``Net.reactivate``,
  ``Net.forward`` after the backbone (hierarchical features, normalised CAM, seeds, prototypes,
  IS-CAM) and ``CAM.forward`` (inference: an image and its mirror fused at the feature level);
* ``train_resnet50_SIPE.py``: ``lossCLS`` and ``lossGSC``;
* ``make_cam.py``: the multi-scale fusion of the IS-CAMs.

The project's functions are fed the same fixed random inputs (several sizes and class counts) and
must give the same values and gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.methods import create_method
from wsss_domains.methods.sipe import (
    IsCamExtractor,
    SideFeatures,
    gsc_loss,
    image_prototypes,
    is_cam,
    normalized_cam,
    structure_seeds,
)
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.models.stages import forward_with_stages

# ---------------------------------------------------------------------------------------------
# Transcription of the official code.
# ---------------------------------------------------------------------------------------------


class OfficialSipeHead(nn.Module):
    """network/resnet50_SIPE.py ``Net`` / ``CAM`` from the backbone's stages on."""

    def __init__(self, num_cls: int, widths: tuple[int, int, int, int], final: int) -> None:
        super().__init__()
        self.num_cls = num_cls
        self.side1 = nn.Conv2d(widths[0], 128, 1, bias=False)
        self.side2 = nn.Conv2d(widths[1], 128, 1, bias=False)
        self.side3 = nn.Conv2d(widths[2], 256, 1, bias=False)
        self.side4 = nn.Conv2d(widths[3], 256, 1, bias=False)
        self.classifier = nn.Conv2d(final, self.num_cls - 1, 1, bias=False)

    def get_seed(self, norm_cam, label, feature):
        n, c, h, w = norm_cam.shape

        # iou evalution
        seeds = torch.zeros((n, h, w, c))
        feature_s = feature.view(n, -1, h * w)
        feature_s = feature_s / (torch.norm(feature_s, dim=1, keepdim=True) + 1e-5)
        correlation = F.relu(torch.matmul(feature_s.transpose(2, 1), feature_s), inplace=True).unsqueeze(1)
        cam_flatten = norm_cam.view(n, -1, h * w).unsqueeze(2)
        inter = (correlation * cam_flatten).sum(-1)
        union = correlation.sum(-1) + cam_flatten.sum(-1) - inter
        miou = (inter / union).view(n, self.num_cls, h, w)
        miou[:, 0] = miou[:, 0] * 0.5
        probs = F.softmax(miou, dim=1)
        belonging = miou.argmax(1)
        seeds = seeds.scatter_(-1, belonging.view(n, h, w, 1), 1).permute(0, 3, 1, 2).contiguous()

        seeds = seeds * label
        return seeds, probs

    def get_prototype(self, seeds, feature):
        n, c, h, w = feature.shape
        seeds = F.interpolate(seeds, feature.shape[2:], mode="nearest")
        crop_feature = seeds.unsqueeze(2) * feature.unsqueeze(1)
        prototype = F.adaptive_avg_pool2d(crop_feature.view(-1, c, h, w), (1, 1)).view(
            n, self.num_cls, c, 1, 1
        )
        return prototype

    def reactivate(self, prototype, feature):
        IS_cam = F.relu(torch.cosine_similarity(feature.unsqueeze(1), prototype, dim=2))
        IS_cam = F.interpolate(IS_cam, feature.shape[2:], mode="bilinear", align_corners=True)
        return IS_cam

    def hie_fea(self, x1, x2, x3, x4):
        side1 = self.side1(x1.detach())
        side2 = self.side2(x2.detach())
        side3 = self.side3(x3.detach())
        side4 = self.side4(x4.detach())

        hie_fea = torch.cat(
            [
                F.interpolate(
                    side1 / (torch.norm(side1, dim=1, keepdim=True) + 1e-5), side3.shape[2:], mode="bilinear"
                ),
                F.interpolate(
                    side2 / (torch.norm(side2, dim=1, keepdim=True) + 1e-5), side3.shape[2:], mode="bilinear"
                ),
                F.interpolate(
                    side3 / (torch.norm(side3, dim=1, keepdim=True) + 1e-5), side3.shape[2:], mode="bilinear"
                ),
                F.interpolate(
                    side4 / (torch.norm(side4, dim=1, keepdim=True) + 1e-5), side3.shape[2:], mode="bilinear"
                ),
            ],
            dim=1,
        )
        return hie_fea, side3

    def forward(self, x1, x2, x3, x4, valid_mask):
        """``Net.forward`` after ``x4 = self.stage4(x3)``."""
        hie_fea, side3 = self.hie_fea(x1, x2, x3, x4)

        sem_feature = x4
        cam = self.classifier(x4)
        score = F.adaptive_avg_pool2d(cam, 1)

        # initialize background map
        norm_cam = F.relu(cam)
        norm_cam = norm_cam / (F.adaptive_max_pool2d(norm_cam, (1, 1)) + 1e-5)
        cam_bkg = 1 - torch.max(norm_cam, dim=1)[0].unsqueeze(1)
        norm_cam = torch.cat([cam_bkg, norm_cam], dim=1)
        norm_cam = F.interpolate(norm_cam, side3.shape[2:], mode="bilinear", align_corners=True) * valid_mask

        seeds, probs = self.get_seed(norm_cam.clone(), valid_mask.clone(), sem_feature.clone())
        prototypes = self.get_prototype(seeds, hie_fea)
        IS_cam = self.reactivate(prototypes, hie_fea)

        return {"score": score, "cam": norm_cam, "seeds": seeds, "prototypes": prototypes, "IS_cam": IS_cam}

    def cam_forward(self, x1, x2, x3, x4, label, x4_head=None):
        """``CAM.forward`` (a batch of an image and its mirror) after the backbone.

        ``x4_head``: the classifier's input where it is not the last stage (a timm EfficientNet's
        ``conv_head`` output); the official ResNet-50 classifies ``x4`` itself.
        """
        hie_fea, side3 = self.hie_fea(x1, x2, x3, x4)

        cam = self.classifier(x4 if x4_head is None else x4_head)
        cam = (cam[0] + cam[1].flip(-1)).unsqueeze(0)
        hie_fea = (hie_fea[0] + hie_fea[1].flip(-1)).unsqueeze(0)

        norm_cam = F.relu(cam)
        norm_cam = norm_cam / (F.adaptive_max_pool2d(norm_cam, (1, 1)) + 1e-5)
        cam_bkg = 1 - torch.max(norm_cam, dim=1)[0].unsqueeze(1)
        norm_cam = torch.cat([cam_bkg, norm_cam], dim=1)
        norm_cam = F.interpolate(norm_cam, side3.shape[2:], mode="bilinear", align_corners=True)

        seeds, _ = self.get_seed(norm_cam.clone(), label.unsqueeze(0).clone(), hie_fea.clone())
        prototypes = self.get_prototype(seeds, hie_fea)
        IS_cam = self.reactivate(prototypes, hie_fea)

        return norm_cam[0], IS_cam[0]


def official_losses(outputs: dict[str, Tensor], label: Tensor) -> dict[str, Tensor]:
    """train_resnet50_SIPE.py: ``lossCLS`` and ``lossGSC`` (``label`` is ``N x K x 1 x 1``)."""
    score = outputs["score"]
    norm_cam = outputs["cam"]
    IS_cam = outputs["IS_cam"]
    lossCLS = F.multilabel_soft_margin_loss(score, label)
    IS_cam = IS_cam / (F.adaptive_max_pool2d(IS_cam, (1, 1)) + 1e-5)
    lossGSC = torch.mean(torch.abs(norm_cam - IS_cam))
    return {"cls": lossCLS, "gsc": lossGSC}


def official_make_cam(outputs: list[tuple[Tensor, Tensor]], size: tuple[int, int], label: Tensor) -> Tensor:
    """make_cam.py's multi-scale fusion; ``label`` with the background prepended. Returns the kept maps."""
    IS_CAM_list = [output[1].cpu() for output in outputs]
    IS_CAM_list = [
        F.interpolate(torch.unsqueeze(o, 1), size, mode="bilinear", align_corners=False) for o in IS_CAM_list
    ]
    IS_CAM = torch.sum(torch.stack(IS_CAM_list, 0), 0)[:, 0]
    IS_CAM /= F.adaptive_max_pool2d(IS_CAM, (1, 1)) + 1e-5
    valid_cat = torch.nonzero(label)[:, 0]
    return IS_CAM[valid_cat]


# ---------------------------------------------------------------------------------------------
# Fixed inputs.
# ---------------------------------------------------------------------------------------------

WIDTHS = (5, 6, 7, 8)
# (batch, classes, stage-3/CAM size, stage-1 size, stage-2 size): stages 3 and 4 share the CAM's
# resolution (the official ResNet-50 has strides 2, 2, 2, 1), the lower ones are larger.
CASES = [
    (2, 3, (6, 7), (24, 28), (12, 14)),
    (1, 5, (8, 8), (32, 32), (16, 16)),
    (3, 2, (5, 9), (10, 18), (10, 18)),
]


def _stages(case, seed: int) -> tuple[list[Tensor], Tensor]:
    n, k, (h, w), s1, s2 = case
    gen = torch.Generator().manual_seed(seed)
    stages = [
        torch.randn(n, WIDTHS[0], *s1, generator=gen),
        torch.randn(n, WIDTHS[1], *s2, generator=gen),
        torch.randn(n, WIDTHS[2], h, w, generator=gen),
        torch.randn(n, WIDTHS[3], h, w, generator=gen),
    ]
    labels = (torch.rand(n, k, generator=gen) < 0.5).float()
    labels[:, 0] = 1
    return stages, labels


def _heads(k: int, seed: int) -> tuple[OfficialSipeHead, SideFeatures, nn.Conv2d]:
    torch.manual_seed(seed)
    official = OfficialSipeHead(k + 1, WIDTHS, WIDTHS[3])
    side = SideFeatures(list(WIDTHS))
    for ours, theirs in zip(
        side.sides, (official.side1, official.side2, official.side3, official.side4), strict=True
    ):
        ours.weight.data.copy_(theirs.weight.data)
    head = nn.Conv2d(WIDTHS[3], k, 1, bias=False)
    head.weight.data.copy_(official.classifier.weight.data)
    return official, side, head


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_seeds_prototypes_and_is_cam_match_the_official_network(case):
    stages, labels = _stages(case, seed=1)
    n, k, (h, w), _, _ = case
    official, side, head = _heads(k, seed=2)
    valid = torch.cat([torch.ones(n, 1), labels], dim=1)
    ref = official(*stages, valid[:, :, None, None])

    cams = head(stages[3])
    features = side(stages, (h, w))
    torch.testing.assert_close(features, official.hie_fea(*stages)[0])
    norm_cam = normalized_cam(cams) * valid[:, :, None, None]
    torch.testing.assert_close(norm_cam, ref["cam"])
    seeds = structure_seeds(norm_cam, stages[3], valid)
    torch.testing.assert_close(seeds, ref["seeds"])
    prototypes = image_prototypes(seeds, features)
    torch.testing.assert_close(prototypes, ref["prototypes"][..., 0, 0])
    torch.testing.assert_close(is_cam(prototypes, features), ref["IS_cam"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        gsc_loss(norm_cam, ref["IS_cam"]), official_losses(ref, labels[:, :, None, None])["gsc"]
    )


@pytest.mark.parametrize("case", CASES)
def test_training_losses_and_gradients_match_the_official_iteration(case):
    stages, labels = _stages(case, seed=3)
    n, k, (h, w), _, _ = case
    official, side, head = _heads(k, seed=4)
    valid = torch.cat([torch.ones(n, 1), labels], dim=1)
    stages_a = [s.clone().requires_grad_() for s in stages]
    ref = official_losses(official(*stages_a, valid[:, :, None, None]), labels[:, :, None, None])

    stages_b = [s.clone().requires_grad_() for s in stages]
    cams = head(stages_b[3])
    outputs = {"cams": cams, "logits": cams.mean(dim=(2, 3)), "features": stages_b[3]}
    outputs.update({f"stage{i}": s for i, s in enumerate(stages_b)})
    method = create_method("sipe")
    losses = method.training_losses(None, nn.ModuleDict({"side": side}), {"label": labels}, outputs)  # type: ignore[arg-type]
    cls = F.binary_cross_entropy_with_logits(outputs["logits"], labels)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(losses["gsc"], ref["gsc"], **tol)
    torch.testing.assert_close(cls, ref["cls"], **tol)

    # Same gradients: the classifier and the final stage through the CAM, the side convolutions
    # through the IS-CAM, nothing into the lower stages (detached in both).
    (ref["cls"] + ref["gsc"]).backward()
    (method.classification_weight * cls + losses["gsc"]).backward()
    torch.testing.assert_close(head.weight.grad, official.classifier.weight.grad, rtol=1e-4, atol=1e-7)
    for ours, theirs in zip(
        side.sides, (official.side1, official.side2, official.side3, official.side4), strict=True
    ):
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-7)
    assert stages_a[0].grad is None and stages_b[0].grad is None
    torch.testing.assert_close(stages_b[3].grad, stages_a[3].grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("labels", [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
def test_inference_matches_official_cam_forward_and_make_cam(labels):
    """IsCamExtractor on a timm model vs ``CAM.forward`` + make_cam.py on the same stages."""
    torch.manual_seed(6)
    model = CamClassifier(num_classes=3, backbone="test_efficientnet", weights="random").eval()
    method = create_method("sipe", background="none")
    modules = method.build_modules(model)
    extractor = method.extractor(model, modules, scales=(1.0, 0.5))
    assert isinstance(extractor, IsCamExtractor)
    image = torch.randn(3, 64, 80)
    ours = extractor(image)  # K x H x W, foreground

    sides = modules["side"].sides
    official = OfficialSipeHead(4, tuple(s.in_channels for s in sides), model.head.in_channels)  # type: ignore[arg-type]
    for theirs, mine in zip(
        (official.side1, official.side2, official.side3, official.side4), sides, strict=True
    ):
        theirs.weight.data.copy_(mine.weight.data)
    official.classifier.weight.data.copy_(model.head.weight.data)
    label = torch.tensor([1.0, *labels])
    outputs = []
    with torch.no_grad():
        for scale in (1.0, 0.5):
            size = (round(64 * scale), round(80 * scale))
            x = (
                image[None]
                if scale == 1.0
                else F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
            )
            batch = torch.cat([x, x.flip(-1)])
            stages = forward_with_stages(model, batch, method.stages)
            x1_4 = (stages[f"stage{i}"] for i in range(4))
            outputs.append(official.cam_forward(*x1_4, label[:, None, None], x4_head=stages["features"]))
    ref = official_make_cam(outputs, (64, 80), label)  # background and present classes

    present = [i for i, v in enumerate(labels) if v]
    # make_cam.py upsamples each scale's map straight to the image; the engine's extractor goes through
    # the scaled image's size first (both bilinear, align_corners=False): equal up to that resampling.
    torch.testing.assert_close(ours[present], ref[1:], rtol=0, atol=0.05)
    # At scale 1 alone there is no intermediate size: equal to rounding.
    extractor.scales = (1.0,)
    ref1 = official_make_cam(outputs[:1], (64, 80), label)
    torch.testing.assert_close(extractor(image)[present], ref1[1:], rtol=1e-4, atol=1e-5)
    # The background IS-CAM: the prototype extractor zeroes foreground wherever it wins.
    method_bg = create_method("sipe")
    fg = method_bg.extractor(model, modules, scales=(1.0,))(image)[present]
    expected = ref1[1:].masked_fill(ref1[1:] <= ref1[:1], 0.0)
    torch.testing.assert_close(fg, expected, rtol=1e-4, atol=1e-5)
