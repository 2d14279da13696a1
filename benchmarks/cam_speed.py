"""CAM extraction speed: the engine's one-pass CamExtractor against pytorch-grad-cam's GradCAM.

Both run the same classifier (``CamClassifier``: EfficientNet-Lite0 with the packaged ImageNet
weights and a seeded random 3-class head), on the same images (8 WSSS4LUAD validation images from
``../shared/data/histo`` when present, else seeded random 300x400 images), at the same scales
(1, 0.5, 1.5, 2) with horizontal-flip averaging, for all three classes of every image.

* The engine runs one forward pass per scale on a batch of the image and its mirror and reads every
  class's map off the bias-free 1x1 head: ``relu(head(features))``.
* GradCAM (``pytorch_grad_cam.GradCAM``) sees a model that returns logits and targets the
  backbone's last feature layer (``backbone.bn2``, whose output is the feature map). It needs a
  forward and a backward pass per class and scale; it is given its best case here, the image and
  its mirror in one batch, so it makes 3 classes x 4 scales = 12 forward+backward passes per image
  against the engine's 4 forward passes. Its library API re-runs the forward pass on every call.
  It is timed twice: as usually run (every parameter requires a gradient, so each backward pass
  goes through the whole network), and in its best case, with every parameter frozen except the
  target layer's, so each backward pass stops at the target layer ("GradCAM, frozen").

Each image is timed by all three in turn, so that load from other processes on a shared machine
hits them alike; per-image times and the median per-image ratio are printed besides the means.

Why the maps must agree, and how they are compared. With global average pooling over an
``h x w`` feature map ``A`` and a bias-free linear head ``W``, the logit of class ``k`` is
``sum_c W_kc mean(A_c)``, so its gradient with respect to ``A_c`` is ``W_kc / (h w)`` at every
position, and GradCAM's channel weight (the spatial mean of that gradient) is ``W_kc / (h w)``.
GradCAM's raw map ``relu(sum_c weight_c A_c)`` is therefore ``relu(head(A))_k / (h w)``: the CAM,
divided by the number of feature cells. Two things then differ from what GradCAM returns:

1. GradCAM min-max normalises each map per call (per class, scale and image: ``(m - min) / max``)
   before resizing it with OpenCV. Summing such maps over scales weights the scales differently
   from summing raw CAMs, and subtracting the minimum shifts every map.
2. The ``1 / (h w)`` factor differs between scales, so even raw GradCAM maps are not summed with
   the weights the engine uses.

So the comparison takes GradCAM's *raw* maps (captured before its normalisation), multiplies each
by its ``h w`` to undo the pooling factor, and aggregates them exactly as the engine does
(bilinear upsampling, flip averaging, sum over scales, per-class max normalisation); the maximum
absolute difference from the engine's maps is reported and should be float round-off. For
information, the mean absolute difference between the engine's maps and maps aggregated from
GradCAM's returned (min-max normalised) outputs is reported too.

Run: ``.venv/bin/python benchmarks/cam_speed.py`` (``--images N``, ``--device cuda`` optional).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor, normalize_per_class
from wsss_domains.cam.settings import DEFAULT_SCALES
from wsss_domains.data.io import read_rgb
from wsss_domains.domains.contract import IMAGENET_MEAN, IMAGENET_STD
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.reports.environment import cpu_model
from wsss_domains.training.data import normalize

ROOT = Path(__file__).resolve().parents[1]
WSSS4LUAD_VAL = ROOT.parent / "shared" / "data" / "histo" / "WSSS4LUAD" / "2.validation" / "img"
NUM_CLASSES = 3


def load_images(n: int) -> tuple[list[Tensor], str]:
    """Real WSSS4LUAD validation images when available, else seeded random ones."""
    if WSSS4LUAD_VAL.is_dir():
        paths = sorted(WSSS4LUAD_VAL.glob("*.png"))[:n]
        if paths:
            return [read_rgb(p) for p in paths], f"{len(paths)} WSSS4LUAD validation images ({WSSS4LUAD_VAL})"
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 300, 400, generator=g) for _ in range(n)], f"{n} seeded random 300x400 images"


class LogitsOnly(nn.Module):
    """What GradCAM expects: a model whose forward returns the class scores."""

    def __init__(self, model: CamClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["logits"]


class RawGradCAM(GradCAM):
    """GradCAM that also keeps its raw (rectified, not yet normalised or resized) maps."""

    raw: np.ndarray

    def get_cam_image(self, *args, **kwargs) -> np.ndarray:
        cam = super().get_cam_image(*args, **kwargs)
        self.raw = np.maximum(cam, 0)
        return cam


def gradcam_maps(gradcam: RawGradCAM, image: Tensor, scales: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Full-size maps of all classes from GradCAM: (from its returned outputs, from its raw maps x h w)."""
    h, w = image.shape[-2:]
    returned = torch.zeros(NUM_CLASSES, h, w)
    raw = torch.zeros(NUM_CLASSES, h, w)
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([scaled, scaled.flip(-1)])
        for k in range(NUM_CLASSES):
            out = torch.from_numpy(gradcam(input_tensor=batch, targets=[ClassifierOutputTarget(k)] * 2))
            returned[k] += F.interpolate(
                (out[0] + out[1].flip(-1))[None, None], size=(h, w), mode="bilinear", align_corners=False
            )[0, 0]
            cells = gradcam.raw.shape[-2] * gradcam.raw.shape[-1]
            cam = torch.from_numpy(gradcam.raw).float()[:, None] * cells  # undo GAP's 1 / (h w)
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            cam = cam[0, 0] + cam[1, 0].flip(-1)
            raw[k] += F.interpolate(cam[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return normalize_per_class(returned), normalize_per_class(raw)


def frozen_copy(model: CamClassifier) -> CamClassifier:
    """The same weights with every parameter frozen but the target layer's: backward stops there."""
    copy = CamClassifier(NUM_CLASSES, backbone="tf_efficientnet_lite0", weights="random").eval()
    copy.load_state_dict(model.state_dict())
    copy = copy.to(next(model.parameters()).device)
    for param in copy.parameters():
        param.requires_grad_(False)
    for param in copy.backbone.bn2.parameters():
        param.requires_grad_(True)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = CamClassifier(NUM_CLASSES, backbone="tf_efficientnet_lite0", weights="imagenet").eval()
    model = model.to(args.device)
    images, source = load_images(args.images)
    images = [normalize(im, IMAGENET_MEAN, IMAGENET_STD).to(args.device) for im in images]
    scales = DEFAULT_SCALES
    extractor = CamExtractor(model, scales=scales, flip=True)
    gradcam = RawGradCAM(model=LogitsOnly(model), target_layers=[model.backbone.bn2])
    frozen = frozen_copy(model)
    gradcam_frozen = RawGradCAM(model=LogitsOnly(frozen), target_layers=[frozen.backbone.bn2])

    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"device: {args.device}; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"images: {source}; sizes {[tuple(im.shape[-2:]) for im in images]}")
    print(f"scales {scales} + flip, {NUM_CLASSES} classes; model {model.weights_source}")

    warm = images[0][:, :64, :64]  # first-call overheads out of the timings
    extractor(warm)
    gradcam_maps(gradcam, warm, (1.0,))
    gradcam_maps(gradcam_frozen, warm, (1.0,))

    def timed(fn, *fn_args):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*fn_args)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    times: dict[str, list[float]] = {"engine": [], "gradcam": [], "frozen": []}
    raw_diff = frozen_diff = 0.0
    returned_diffs = []
    for i, image in enumerate(images):
        engine, t_engine = timed(extractor, image)
        (returned, raw), t_gradcam = timed(gradcam_maps, gradcam, image, scales)
        (_, raw_frozen), t_frozen = timed(gradcam_maps, gradcam_frozen, image, scales)
        engine = engine.cpu()
        raw_diff = max(raw_diff, float((engine - raw).abs().max()))
        frozen_diff = max(frozen_diff, float((raw - raw_frozen).abs().max()))
        returned_diffs.append(float((engine - returned).abs().mean()))
        for key, value in zip(times, (t_engine, t_gradcam, t_frozen), strict=True):
            times[key].append(value)
        print(
            f"  image {i} {tuple(image.shape[-2:])}: engine {t_engine:6.2f} s, GradCAM {t_gradcam:6.2f} s, "
            f"GradCAM frozen {t_frozen:6.2f} s",
            flush=True,
        )

    def ms(key: str) -> float:
        return 1000 * float(np.mean(times[key]))

    def ratio(key: str) -> str:
        mean = sum(times[key]) / sum(times["engine"])
        median = float(np.median(np.array(times[key]) / np.array(times["engine"])))
        return f"{mean:.1f}x (median per image {median:.1f}x)"

    passes = len(scales) * NUM_CLASSES
    print(f"engine CamExtractor: {ms('engine'):8.1f} ms/image  ({len(scales)} forward passes of 2 images)")
    print(
        f"GradCAM:             {ms('gradcam'):8.1f} ms/image  ({passes} forward+backward passes of 2 images)"
    )
    print(f"GradCAM, frozen:     {ms('frozen'):8.1f} ms/image  (same, backward stopping at the target layer)")
    print(f"speed-up over GradCAM:        {ratio('gradcam')} (target >= 5x)")
    print(f"speed-up over GradCAM frozen: {ratio('frozen')}")
    print(
        f"agreement, GradCAM raw maps x (h w) vs engine, per-class max-normalised: max |diff| = {raw_diff:.2e}"
    )
    print(f"GradCAM frozen vs GradCAM raw maps: max |diff| = {frozen_diff:.2e}")
    print(
        f"for information, GradCAM's returned min-max maps vs engine: mean |diff| = {np.mean(returned_diffs):.3f}"
    )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
