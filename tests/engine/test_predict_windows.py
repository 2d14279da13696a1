"""Label-free prediction of rasters and slides window by window: equal to the whole image, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from rasterio.transform import from_origin
from torch import nn

from wsss_domains.domains import create_domain
from wsss_domains.errors import UserError
from wsss_domains.segmentation.inference import InferenceOptions, SegmenterPredictor
from wsss_domains.segmentation.model import SegmenterConfig, build_segmenter, save_segmenter
from wsss_domains.segmentation.raster import RasterSource, WindowedOptions, predict_windows

HISTO_CLASSES = ["tumor", "stroma", "normal"]
CRS = "EPSG:32633"


class ShallowNet(nn.Module):
    """Three 3x3 convolutions, no stride: each output pixel sees 3 pixels a side, shifts commute."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, classes, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def histo_config(**overrides: object) -> SegmenterConfig:
    values: dict = dict(domain="histo", dataset="wsss4luad", classes=HISTO_CLASSES, arch="fpn",
                        encoder="test_efficientnet", weights="random", crop_size=[64, 64])  # fmt: skip
    return SegmenterConfig(**{**values, **overrides})


def tissue_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """White glass with smooth coloured tissue regions (uint8 H x W x 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3))
    ys, xs = np.linspace(0, coarse.shape[0] - 1, h), np.linspace(0, coarse.shape[1] - 1, w)
    smooth = coarse[ys.round().astype(int)][:, xs.round().astype(int)]
    image = np.full((h, w, 3), 246, np.float64)
    tissue = np.zeros((h, w), bool)
    tissue[h // 8 : h // 2, w // 8 : w // 2] = True
    tissue[h // 2 :, 2 * w // 3 :] = True
    image[tissue] = 0.6 * smooth[tissue] + rng.normal(0, 6, (int(tissue.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_a_raster_predicted_window_by_window_equals_the_whole_image_prediction(tmp_path: Path):
    domain = create_domain("histo")
    label_space = domain.dataset("wsss4luad").label_space
    h, w = 192, 288  # multiples of the 32-pixel stride: no path pads the image, so borders agree too
    pixels = tissue_image(h, w)
    raster = tmp_path / "scene.tif"
    profile = dict(driver="GTiff", height=h, width=w, count=3, dtype="uint8", crs=CRS,
                   transform=from_origin(500000.0, 4000000.0, 0.5, 0.5))  # fmt: skip
    with rasterio.open(raster, "w", **profile) as dst:
        dst.write(np.moveaxis(pixels, -1, 0))
    # One network window covers the whole image and each context, so both paths see the same padding.
    predictor = SegmenterPredictor(
        ShallowNet(3), histo_config(), InferenceOptions(window=320, runtime="torch")
    )
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    whole = predictor.labels(image, domain, label_space).numpy()
    out = tmp_path / "pred.tif"
    options = WindowedOptions(window=64, margin=16, overview=tmp_path / "overview.png")
    summary = predict_windows(predictor, domain, label_space, RasterSource(raster), out, options)
    with rasterio.open(out) as src:
        windowed = src.read(1)
        assert src.crs.to_string() == CRS and src.transform == profile["transform"]
        assert src.colormap(1)[0][:3] == label_space.palette[0]
        assert src.overviews(1) == [2]  # a pyramid down to 128 px
    # Away from the window seams (here: everywhere, the net sees 3 px and the margin is 16) they agree.
    assert summary.windows == 3 * 5 and np.array_equal(windowed, whole.astype(np.uint8))
    assert 0.2 < float((windowed == 255).mean()) < 0.8  # white glass unscored, tissue labelled
    assert (tmp_path / "overview.png").is_file()
    again = predict_windows(predictor, domain, label_space, RasterSource(raster), out, options)
    assert again.already_done


def test_multi_scale_test_time_augmentation_averages_each_scales_flip_averaged_probabilities():
    net = ShallowNet(3).eval()
    x = torch.rand(3, 128, 192)
    # Sides that are multiples of 32 at every scale: each scale is one unpadded window, so the
    # sliding window adds nothing and the expected maps follow from the network alone.
    options = InferenceOptions(window=512, runtime="torch", tta_scales=(0.5, 1.0, 1.5))
    got = SegmenterPredictor(net, histo_config(), options).probabilities(x)
    expected = torch.zeros(3, 128, 192)
    with torch.no_grad():
        for s in (0.5, 1.0, 1.5):
            size = (int(128 * s), int(192 * s))
            small = nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)
            probs = (net(small).softmax(1) + net(small.flip(-1)).softmax(1).flip(-1)) / 2
            expected += (
                nn.functional.interpolate(probs, size=(128, 192), mode="bilinear", align_corners=False)[0] / 3
            )
    assert torch.allclose(got, expected, atol=1e-5)
    single = SegmenterPredictor(
        net, histo_config(), InferenceOptions(window=512, runtime="torch")
    ).probabilities(x)
    assert not torch.allclose(got, single, atol=1e-3)  # the extra scales change the maps
    with pytest.raises(UserError, match="tta-scales"):
        InferenceOptions(tta_scales=(1.0, 0.0)).check()


def test_rotation_test_time_augmentation_averages_the_eight_views_of_the_dihedral_group():
    net = ShallowNet(3).eval()
    x = torch.rand(3, 96, 160)  # not square: a turned window has another shape
    options = InferenceOptions(window=512, runtime="torch", tta_rotations=True)
    got = SegmenterPredictor(net, histo_config(), options).probabilities(x)
    expected = torch.zeros(3, 96, 160)
    with torch.no_grad():
        for k in range(4):  # each quarter turn and its mirror, turned back: the 8 symmetries of a square
            for mirror in (False, True):
                view = torch.rot90(x, k, (1, 2))
                view = view.flip(-1) if mirror else view
                probs = net(view[None]).softmax(1)[0]
                probs = probs.flip(-1) if mirror else probs
                expected += torch.rot90(probs, -k, (1, 2)) / 8
    assert torch.allclose(got, expected, atol=1e-5)
    plain = SegmenterPredictor(net, histo_config(), InferenceOptions(window=512, runtime="torch"))
    assert not torch.allclose(got, plain.probabilities(x), atol=1e-3)  # the turns change the maps


def write_slide(path: Path, h: int = 256, w: int = 384) -> np.ndarray:
    """A small pyramidal tiled TIFF (3 levels, 0.5 µm/px), as a scanner would write one."""
    level0 = tissue_image(h, w, seed=3)
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, subifds=2, tile=(64, 64), photometric="rgb", compression="zlib",
                  resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
        for f in (2, 4):
            tif.write(np.ascontiguousarray(level0[::f, ::f]), subfiletype=1, tile=(64, 64), photometric="rgb",
                      compression="zlib")  # fmt: skip
    return level0


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("histo-seg")
    config = histo_config()
    torch.manual_seed(0)
    save_segmenter(build_segmenter(config), config, folder)
    return folder


CHILD = """
import sys, time
from pathlib import Path
from wsss_domains.segmentation import inference
from wsss_domains.pipeline.predict import predict_slides
from wsss_domains.segmentation.inference import InferenceOptions
from wsss_domains.segmentation.raster import WindowedOptions

slow = inference.SegmenterPredictor.labels
def labels(self, *args, **kwargs):
    time.sleep(0.4)
    return slow(self, *args, **kwargs)
inference.SegmenterPredictor.labels = labels
predict_slides(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), level=0,
               options=InferenceOptions(window=64, runtime="torch"),
               windowed=WindowedOptions(window=64, margin=16))
"""


def _slide_labels(tif: Path) -> np.ndarray:
    with rasterio.open(tif) as src:
        return src.read(1)


@pytest.mark.slow
def test_a_slide_is_predicted_over_tissue_only_and_resumes_after_a_kill(segmenter: Path, tmp_path: Path):
    from wsss_domains.pipeline.predict import predict_slides

    slide = tmp_path / "slide.tif"
    write_slide(slide)
    options = InferenceOptions(window=64, runtime="torch")
    windowed = WindowedOptions(window=64, margin=16)
    reference = tmp_path / "reference"
    [fresh] = predict_slides(segmenter, slide, reference, options=options, windowed=windowed)
    assert (fresh.height, fresh.width, fresh.windows) == (256, 384, 24)
    assert 0 < fresh.skipped_windows < fresh.windows  # glass-only windows never reach the network
    labels = _slide_labels(reference / "slide.tif")
    assert labels.shape == (256, 384) and bool((labels[:16, :] == 255).all())  # glass: unscored
    assert set(np.unique(labels)) - {255} <= {0, 1, 2} and (labels != 255).mean() > 0.2
    with rasterio.open(reference / "slide.tif") as src:
        assert src.overviews(1)  # pyramidal
    assert (reference / "slide.png").is_file()  # thumbnail overlay
    # Killed mid-way (SIGKILL: no clean-up at all), then resumed: the same bytes of labels.
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(segmenter), str(slide), str(out)], env=env)
    progress = out / ".slide.tif.progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text()).get("second") or []) >= 6:
            break
        time.sleep(0.1)
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "slide.tif").exists() and progress.is_file()
    [resumed] = predict_slides(segmenter, slide, out, options=options, windowed=windowed)
    assert resumed.resumed_windows >= 6
    assert np.array_equal(_slide_labels(out / "slide.tif"), labels)
    assert not progress.exists() and not list(out.glob(".*.part"))


def test_a_slide_at_a_coarser_resolution(segmenter: Path, tmp_path: Path):
    from wsss_domains.pipeline.predict import predict_slides

    slide = tmp_path / "slide.tif"
    write_slide(slide)
    options = InferenceOptions(window=64, runtime="torch")
    windowed = WindowedOptions(window=64, margin=16)
    [level1] = predict_slides(segmenter, slide, tmp_path / "l1", level=1, options=options, windowed=windowed)
    [mpp] = predict_slides(segmenter, slide, tmp_path / "mpp", mpp=1.5, options=options, windowed=windowed)
    assert (level1.height, level1.width) == (128, 192) and level1.extra["mpp"] == 1.0
    assert (mpp.height, mpp.width) == (85, 128) and mpp.extra["level"] == 1  # 1.0 µm/px resampled to 1.5


def test_a_large_image_in_a_folder_is_predicted_window_by_window_as_it_would_be_whole(tmp_path: Path):
    from PIL import Image

    from wsss_domains.data.io import read_index_mask
    from wsss_domains.segmentation.writer import ImageFolder, predict_images

    domain = create_domain("histo")
    label_space = domain.dataset("wsss4luad").label_space
    (tmp_path / "images").mkdir()
    Image.fromarray(tissue_image(192, 288)).save(tmp_path / "images" / "big.png")
    Image.fromarray(tissue_image(64, 64, seed=2)).save(tmp_path / "images" / "small.png")
    predictor = SegmenterPredictor(
        ShallowNet(3), histo_config(), InferenceOptions(window=320, runtime="torch")
    )
    decoded: list[str] = []

    class Spy(ImageFolder):
        def __getitem__(self, index: int):
            decoded.append(self.ids[index])
            return super().__getitem__(index)

    def run(out: Path, limit: int | None):
        return predict_images(
            predictor, Spy(tmp_path / "images"), domain, label_space, out,
            max_image_pixels=limit, windowed=WindowedOptions(window=64, margin=16),
        )  # fmt: skip

    windowed = run(tmp_path / "windowed", 100 * 100)
    assert windowed.windowed == ["big.png"] and windowed.written == 2
    assert "small" in decoded and "big" not in decoded  # the large image is never decoded whole
    run(tmp_path / "whole", None)
    for name in ("big.png", "small.png"):
        got = read_index_mask(tmp_path / "windowed" / name).numpy()
        assert np.array_equal(got, read_index_mask(tmp_path / "whole" / name).numpy())
    assert not (tmp_path / "windowed" / ".large").exists()
