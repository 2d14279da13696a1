"""The multi-scale, flip-averaged, tiled CAM extractor against hand computations."""

from __future__ import annotations

import fakes
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor, normalize_per_class
from wsss_domains.data.windows import balanced_tile
from wsss_domains.models.classifier import CamClassifier


@pytest.fixture
def model() -> CamClassifier:
    torch.manual_seed(3)
    net = CamClassifier(3, backbone=fakes.FAST_BACKBONE, weights="random").eval()
    with torch.no_grad():  # every class responds somewhere, so no map is all zero
        net.head.weight.normal_(0.0, 1.0)
    return net


def hand_cams(model: CamClassifier, image: Tensor, scales: tuple[float, ...], flip: bool) -> Tensor:
    """relu(head(features)) upsampled to each scaled image, flip-averaged, back to full size, summed."""
    h, w = image.shape[-2:]
    total = torch.zeros(model.num_classes, h, w)
    with torch.no_grad():
        for s in scales:
            size = (round(h * s), round(w * s))
            scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
            views = [scaled, scaled.flip(-1)] if flip else [scaled]
            summed = torch.zeros(1, model.num_classes, *size)
            for k, view in enumerate(views):
                cam = F.relu(model.head(model.backbone.forward_features(view)))
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
                summed += cam.flip(-1) if k == 1 else cam
            total += F.interpolate(summed, size=(h, w), mode="bilinear", align_corners=False)[0]
    peak = total.flatten(1).amax(1)
    return total / peak[:, None, None]


@pytest.mark.parametrize("flip", [True, False])
def test_extractor_equals_the_hand_computation(model: CamClassifier, flip: bool):
    image = torch.randn(3, 40, 56)
    scales = (1.0, 0.5, 1.5)
    cams = CamExtractor(model, scales=scales, flip=flip)(image)
    assert cams.shape == (3, 40, 56)
    torch.testing.assert_close(cams, hand_cams(model, image, scales, flip), atol=1e-5, rtol=1e-4)


def test_flip_averaging_makes_maps_of_a_mirror_symmetric_image_symmetric(model: CamClassifier):
    half = torch.randn(3, 48, 32)
    image = torch.cat([half, half.flip(-1)], dim=-1)
    flipped = CamExtractor(model, scales=(1.0, 0.5), flip=True)(image)
    torch.testing.assert_close(flipped, flipped.flip(-1), atol=1e-5, rtol=1e-5)
    plain = CamExtractor(model, scales=(1.0, 0.5), flip=False)(image)
    assert not torch.allclose(
        plain, plain.flip(-1), atol=1e-3
    )  # random convolutions are not mirror-symmetric


def test_extractor_output_is_normalised_per_class(model: CamClassifier):
    cams = CamExtractor(model, scales=(1.0,), flip=True)(torch.randn(3, 32, 32))
    assert cams.min() >= 0
    torch.testing.assert_close(cams.flatten(1).amax(1), torch.ones(3))


def test_normalize_per_class_divides_each_map_by_its_own_peak():
    cams = torch.tensor([[[0.0, 2.0], [4.0, 1.0]], [[0.5, 0.25], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    out = normalize_per_class(cams)
    expected = torch.tensor([[[0.0, 0.5], [1.0, 0.25]], [[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(out, expected)
    batched = normalize_per_class(torch.stack([cams, 2 * cams]))  # leading batch dimension
    torch.testing.assert_close(batched, torch.stack([expected, expected]))


class LocalCam(nn.Module):
    """A CAM model with a 3x3 receptive field and stride 2: tiles agree with the whole image inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1 / 9  # class 0: local mean of channel 0
            self.conv.weight[1, 1] = 1 / 9  # class 1: local mean of channel 1
            self.conv.weight[1, 2, 1, 1] = -0.2
        self.inputs: list[tuple[int, int]] = []

    def cams(self, x: Tensor, rectify: bool = True) -> Tensor:
        self.inputs.append(tuple(x.shape[-2:]))
        maps = F.avg_pool2d(self.conv(x), 2)
        return F.relu(maps) if rectify else maps


def test_tiled_maps_match_untiled_away_from_tile_borders():
    torch.manual_seed(0)
    image = torch.rand(3, 96, 128) * 0.3
    image[0, 44:52, 44:52] = 1.0  # each class peaks away from every tile border,
    image[1, 10:18, 110:118] = 1.0  # so both runs normalise by the same maximum
    tiled_model, whole_model = LocalCam(), LocalCam()
    tiled = CamExtractor(tiled_model, scales=(1.0, 0.5), tile_size=64, tile_overlap=32)(image)
    whole = CamExtractor(whole_model, scales=(1.0, 0.5), tile_size=1024)(image)
    # Scale 1 is cut into 2 x 3 tiles of 64 px (starts every 32 px); scale 0.5 (48 x 64) fits one tile.
    assert tiled_model.inputs == [(64, 64)] * 6 + [(48, 64)]
    assert whole_model.inputs == [(96, 128), (48, 64)]
    margin = 6  # padding reaches 1 px, pooling and upsampling 2 px more; the 0.5 scale is untiled
    ys, xs = torch.arange(96), torch.arange(128)
    near = lambda v: ((v % 32) < margin) | ((v % 32) >= 32 - margin)  # noqa: E731
    interior = ~near(ys)[:, None] & ~near(xs)[None, :]
    assert interior.float().mean() > 0.3
    torch.testing.assert_close(tiled[:, interior], whole[:, interior], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled.flatten(1).amax(1), torch.ones(2))
    assert (tiled - whole).abs().max() > 1e-3  # the borders do differ: the comparison is not vacuous


def test_base_scale_multiplies_every_scale():
    model = LocalCam()
    CamExtractor(model, scales=(0.5, 1.0), flip=False, base_scale=2.0)(torch.rand(3, 20, 30))
    assert model.inputs == [(20, 30), (40, 60)]


def test_raw_maps_is_the_override_point():
    class Uniform(CamExtractor):
        def raw_maps(self, batch: Tensor) -> Tensor:
            maps = torch.zeros(batch.shape[0], 2, 4, 4)
            maps[:, 0] = 3.0
            maps[:, 1, :, :2] = 1.0  # left half; mirrored back, the flip halves it on each side
            return maps

    cams = Uniform(nn.Identity(), scales=(1.0,), flip=True)(torch.rand(3, 8, 8))
    torch.testing.assert_close(cams[0], torch.ones(8, 8))
    assert cams[1].max() == 1.0 and cams[1].min() >= 0
    torch.testing.assert_close(cams[1], cams[1].flip(-1))


def test_tiles_are_balanced_so_the_last_one_wastes_no_work():
    assert balanced_tile(2560, 1280, 64) == 896  # three tiles: 2688 pixels, not 3 x 1280
    assert balanced_tile(1000, 1280, 64) == 1000 and balanced_tile(1280, 1280, 64) == 1280
    model = LocalCam()
    CamExtractor(model, scales=(1.0,), flip=False, tile_size=64, tile_overlap=8)(torch.rand(3, 70, 40))
    # 70 rows: two balanced tiles of ceil(62 / 2) + 8 = 39 rows, at rows 0 and 31
    assert model.inputs == [(39, 40), (39, 40)]
