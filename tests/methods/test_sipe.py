"""SIPE against its defining formulas (chenqi1126/SIPE, network/resnet50_SIPE.py), then training."""

from __future__ import annotations

import math

import pytest
import torch
from method_training import changed, train_steps
from torch import Tensor

from wsss_domains.methods import create_method
from wsss_domains.methods.sipe import (
    IsCamExtractor,
    gsc_loss,
    image_prototypes,
    is_cam,
    normalized_cam,
    structure_seeds,
)

EPS = 1e-5


def test_normalized_cam_adds_the_background():
    cams = torch.tensor([[[[2.0, -1.0, 1.0]], [[0.0, 4.0, 2.0]]]])  # 1 x 2 classes x 1 x 3
    c0 = [v / (2 + EPS) for v in (2.0, 0.0, 1.0)]
    c1 = [v / (4 + EPS) for v in (0.0, 4.0, 2.0)]
    bg = [1 - max(a, b) for a, b in zip(c0, c1, strict=True)]
    torch.testing.assert_close(normalized_cam(cams)[0, :, 0], torch.tensor([bg, c0, c1]))


def _hand_seeds(cam: list[list[float]], feats: list[list[float]]) -> list[int]:
    """Each pixel's arg-max class of IoU(neighbourhood, CAM), background (class 0) IoU halved."""
    unit = [[x / (math.hypot(*f) + EPS) for x in f] for f in feats]
    n = len(feats)
    a = [
        [max(sum(p * q for p, q in zip(unit[i], unit[j], strict=True)), 0.0) for j in range(n)]
        for i in range(n)
    ]
    out = []
    for i in range(n):
        ious = []
        for c, m in enumerate(cam):
            inter = sum(a[i][j] * m[j] for j in range(n))
            iou = inter / (sum(a[i]) + sum(m) - inter)
            ious.append(iou * 0.5 if c == 0 else iou)
        out.append(max(range(len(cam)), key=lambda c: ious[c]))
    return out


def test_structure_seeds_by_hand():
    # Six pixels in three feature groups; each group's pixels should seed the class whose CAM covers it.
    feats = [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.1, 1, 0], [0, 0, 1], [0, 0.1, 1]]
    cam = [[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0.2], [0, 0, 0, 0.1, 1, 0.8]]  # background, class 1, class 2
    norm_cam = torch.tensor(cam, dtype=torch.float32)[None, :, None, :]
    features = torch.tensor(feats, dtype=torch.float32).t()[None, :, None, :]
    seeds = structure_seeds(norm_cam, features)
    expected = _hand_seeds(cam, feats)
    assert expected == [1, 1, 0, 0, 2, 2]
    assert seeds[0, :, 0].argmax(dim=0).tolist() == expected
    assert seeds.sum(dim=1).eq(1).all()  # one-hot
    # Seeds of an absent class are dropped by the valid mask.
    valid = torch.tensor([[1.0, 1.0, 0.0]])
    masked = structure_seeds(norm_cam, features, valid)
    assert masked[0, 2].sum() == 0
    torch.testing.assert_close(masked[0, :2], seeds[0, :2])


def test_prototypes_and_is_cam_by_hand():
    seeds = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]])  # 2 classes x 1 x 3 pixels
    features = torch.tensor([[[[1.0, 3.0, 0.0]], [[0.0, 4.0, 2.0]]]])  # D=2 at pixels (1,0), (3,4), (0,2)
    protos = image_prototypes(seeds, features)
    # The spatial mean over all 3 pixels (adaptive average pooling), seeds masking the others out.
    torch.testing.assert_close(protos, torch.tensor([[[4 / 3, 4 / 3], [0.0, 2 / 3]]]))
    maps = is_cam(protos, features)
    pixels = [(1.0, 0.0), (3.0, 4.0), (0.0, 2.0)]

    def cos(u: tuple[float, float], v: list[float]) -> float:
        return max((u[0] * v[0] + u[1] * v[1]) / (math.hypot(*u) * math.hypot(*v)), 0.0)

    expected = [[cos(p, proto) for p in pixels] for proto in protos[0].tolist()]
    torch.testing.assert_close(maps[0, :, 0], torch.tensor(expected))


def test_gsc_loss_by_hand():
    norm_cam = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    iscam = torch.tensor([[[[0.5, 0.25]], [[0.2, 0.4]]]])
    scaled = [[0.5 / (0.5 + EPS), 0.25 / (0.5 + EPS)], [0.2 / (0.4 + EPS), 0.4 / (0.4 + EPS)]]
    expected = (
        abs(1 - scaled[0][0]) + abs(0 - scaled[0][1]) + abs(0 - scaled[1][0]) + abs(1 - scaled[1][1])
    ) / 4
    assert float(gsc_loss(norm_cam, iscam)) == pytest.approx(expected, rel=1e-6)


class _FixedMaps(IsCamExtractor):
    """IS-CAMs fixed by hand: background, class 0, class 1 over a 1x3 image."""

    def raw_maps(self, batch: Tensor) -> Tensor:
        maps = torch.tensor([[[0.5, 0.5, 0.9]], [[1.0, 0.2, 0.3]], [[0.4, 0.6, 0.45]]])
        return maps[None].expand(batch.shape[0], -1, -1, -1)


def test_extractor_zeroes_foreground_where_the_background_prototype_wins():
    image = torch.zeros(3, 1, 3)
    prototype = _FixedMaps(None, None, (), "prototype", scales=(1.0,), flip=False)(image)  # type: ignore[arg-type]
    plain = _FixedMaps(None, None, (), "none", scales=(1.0,), flip=False)(image)  # type: ignore[arg-type]
    # Each map divided by its maximum: background /0.9, class 0 /1.0, class 1 /0.6.
    bg = torch.tensor([0.5, 0.5, 0.9]) / 0.9
    c0 = torch.tensor([1.0, 0.2, 0.3])
    c1 = torch.tensor([0.4, 0.6, 0.45]) / 0.6
    torch.testing.assert_close(plain[:, 0], torch.stack([c0, c1]), atol=1e-4, rtol=0)
    expected = torch.stack([c0 * (c0 > bg), c1 * (c1 > bg)])
    torch.testing.assert_close(prototype[:, 0], expected, atol=1e-4, rtol=0)


def test_two_training_steps_and_the_is_cam_extractor():
    method = create_method("sipe")
    task, logged, initial = train_steps(method)
    assert math.isfinite(logged["train/gsc"]) and math.isfinite(logged["train/cls_loss"])
    assert changed(task, initial, "side")  # the GSC loss trains the side convolutions
    extractor = method.extractor(task.model, task.method_modules, scales=(1.0, 0.5))
    assert isinstance(extractor, IsCamExtractor)
    image = torch.randn(3, 40, 48)
    cams = extractor(image)
    assert cams.shape == (2, 40, 48) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    # An image and its mirror are fused at the feature level, so the maps are mirror-symmetric.
    torch.testing.assert_close(extractor(image.flip(-1)).flip(-1), cams, atol=1e-5, rtol=1e-4)


def test_sipe_rejects_bad_options():
    with pytest.raises(ValueError):
        create_method("sipe", background="threshold")
    with pytest.raises(ValueError):
        create_method("sipe", stages=[-2, -1])
