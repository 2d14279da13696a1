"""The segmenter over an image of any size: overlapping windows blended, flips averaged.

MONAI's sliding-window inference cuts the (scaled, normalised) image into ``window``-sized windows
that overlap by ``overlap``, runs them in batches and blends their class probabilities with a
Gaussian weight, so window seams do not show. Each window is also seen mirrored (flip test-time
augmentation), optionally also turned by 90, 180 and 270 degrees (for imagery without an up:
tissue, overhead scenes) and the whole image at several sizes (multi-scale test-time
augmentation, as DeepLab evaluates). Pixels the domain excludes (white glass, no-data) get the
ignore index. No image-level label is read or needed: this is how the segmenter serves unlabelled
data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.models.runtime import RUNTIMES, fast_forward, resolve_runtime
from wsss_domains.segmentation.model import SegmenterConfig
from wsss_domains.settings import setting
from wsss_domains.training.data import normalize

DEFAULT_WINDOW = 512
MAX_TTA_SCALE = 4.0


@dataclass
class InferenceOptions:
    """How the segmenter is run over an image."""

    window: int = setting(
        DEFAULT_WINDOW, help="side of the windows the network sees (sliding window, Gaussian-blended seams)"
    )
    overlap: float = setting(0.25, help="overlap of neighbouring network windows")
    # Windows per forward pass (each doubled by the flip). One: memory stays bounded by a single
    # window pair; more windows per pass were not faster on the CPU (benchmarks/results/predict_raster_memory.md).
    batch: int = 1
    flip: bool = setting(True, help="no horizontal-flip test-time augmentation")
    tta_rotations: bool = setting(
        False,
        help="also see each window turned by 90, 180 and 270 degrees and average (for imagery without an up:"
        " tissue, overhead scenes); 4x the network's cost",
    )
    tta_scales: tuple[float, ...] = setting(
        (1.0,),
        help="test-time scales: the image is also seen resized by each factor (on top of the segmenter's "
        "training scale) and the class probabilities are averaged; costs about the sum of the squared factors",
        metavar="0.75,1,1.25",
    )
    runtime: str = setting(
        "auto",
        help="auto: ONNX Runtime on the CPU (same outputs, ~4x faster), PyTorch on a GPU",
        choices=RUNTIMES,
    )
    device: str = "cpu"

    def check(self) -> None:
        if self.window < 32 or self.window % 32:
            raise UserError(f"--network-window must be a positive multiple of 32, got {self.window}")
        if not 0.0 <= self.overlap < 1.0:
            raise UserError(f"--overlap must lie in [0, 1), got {self.overlap}")
        if self.batch < 1:
            raise UserError(f"the window batch must be at least 1, got {self.batch}")
        self.tta_scales = tuple(float(s) for s in self.tta_scales)
        if not self.tta_scales or not all(0 < s <= MAX_TTA_SCALE for s in self.tta_scales):
            raise UserError(f"--tta-scales must lie in (0, {MAX_TTA_SCALE:g}], got {self.tta_scales}")


def window_probabilities(
    forward: Callable[[Tensor], Tensor], x: Tensor, flip: bool, rotations: bool = False
) -> Tensor:
    """Softmax probabilities of a batch of windows, averaged with those of their mirror images
    and, with ``rotations``, of the windows turned by 90, 180 and 270 degrees (each turned back).

    A view and its mirror go through the network as one batch (a turned window of a non-square
    size has another shape). The softmax stays in PyTorch: ONNX Runtime's softmax over the channel
    axis of a ``B x K x H x W`` map costs more than the network's decoder.
    """
    turns = (0, 1, 2, 3) if rotations else (0,)
    total = None
    for k in turns:
        view = x.rot90(k, (-2, -1)) if k else x
        if flip:
            n = view.shape[0]
            both = forward(torch.cat([view, view.flip(-1)])).float().softmax(1)
            probs = (both[:n] + both[n:].flip(-1)) / 2
        else:
            probs = forward(view).float().softmax(1)
        probs = probs.rot90(-k, (-2, -1)) if k else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(turns) if len(turns) > 1 else total


class SegmenterPredictor:
    """Class probabilities and labels of whole images from a trained segmenter."""

    def __init__(
        self,
        model: nn.Module,
        config: SegmenterConfig,
        options: InferenceOptions | None = None,
        cache: Path | None = None,
    ) -> None:
        self.options = options or InferenceOptions()
        self.options.check()
        self.model = model.eval()
        self.config = config
        runtime = resolve_runtime(self.options.runtime, self.options.device)
        example = torch.randn(2, 3, 96, 128)
        # No memory arena: a raster's windows all have one size, and the arena's kept peak would
        # add about 0.1 GB to prediction's memory (benchmarks/results/predict_raster_memory.md).
        self.fast = fast_forward(self.model, example, runtime, dynamic=(0, 2, 3), cache=cache, arena=False)
        self._weights: dict[tuple[int, int], Tensor] = {}

    def _forward(self, batch: Tensor) -> Tensor:
        if self.fast is not None:
            return self.fast(batch).to(batch.device)
        if batch.device.type != "cuda":
            return self.model(batch)
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=half):
            return self.model(batch)

    def _windows(self, batch: Tensor) -> Tensor:
        """Probabilities of a batch of windows (all views averaged: flips, turns)."""
        return window_probabilities(self._forward, batch, self.options.flip, self.options.tta_rotations)

    def _weight_map(self, roi: tuple[int, int], device: torch.device) -> Tensor:
        """The Gaussian blending weight of a window, computed once per window size."""
        from monai.data.utils import compute_importance_map

        if roi not in self._weights:
            self._weights[roi] = compute_importance_map(
                roi, mode="gaussian", sigma_scale=0.125, device=device
            )
        return self._weights[roi].to(device)

    @torch.inference_mode()
    def probabilities(self, x: Tensor) -> Tensor:
        """``K x H x W`` class probabilities of a normalised ``3 x H x W`` image (mean over the test scales)."""
        scales = self.options.tta_scales
        total = self._probabilities_at(x, self.config.scale * scales[0])
        for scale in scales[1:]:
            total += self._probabilities_at(x, self.config.scale * scale)
        return total / len(scales) if len(scales) > 1 else total

    def _probabilities_at(self, x: Tensor, scale: float) -> Tensor:
        """Class probabilities of the image resized by ``scale``, back at its own size."""
        from monai.inferers import sliding_window_inference

        h, w = x.shape[-2:]
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        # Windows of ``window`` pixels; an image smaller than that is seen whole (padded only up to the
        # encoders' stride of 32), not padded to a full window.
        roi = tuple(min(self.options.window, -(-side // 32) * 32) for side in x.shape[-2:])
        probs = sliding_window_inference(
            x[None],
            roi_size=roi,
            sw_batch_size=self.options.batch,
            predictor=self._windows,
            overlap=self.options.overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
            roi_weight_map=self._weight_map(roi, x.device),  # type: ignore[arg-type]
        )
        if scale != 1.0:
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        return probs[0]

    def prepare(self, image: Tensor, domain: DomainPlugin) -> Tensor:
        """The network input of an image in [0, 1]: the domain's colour handling, then normalisation."""
        x = normalize(domain.preprocess(image), self.config.mean, self.config.std)
        return x.to(self.options.device)

    def labels(
        self, image: Tensor, domain: DomainPlugin, label_space: LabelSpace, exclude: Tensor | None = None
    ) -> Tensor:
        """``H x W`` class ids of an image in [0, 1]; excluded pixels get the ignore index.

        ``exclude``: pixels known not to be scored from the pixels themselves (raster no-data);
        the domain's own rule (e.g. white glass) is added to it.
        """
        probs = self.probabilities(self.prepare(image, domain))
        return labels_from_probabilities(probs, image, domain, label_space, exclude)


def labels_from_probabilities(
    probs: Tensor, image: Tensor, domain: DomainPlugin, label_space: LabelSpace, exclude: Tensor | None = None
) -> Tensor:
    """``H x W`` class ids of ``C x H x W`` probabilities of ``image``; excluded pixels (``exclude`` and
    the domain's own rule) get the ignore index. Shared by one segmenter and averaged segmenters."""
    ids = probs.argmax(0).cpu()
    rule = domain.exclude_mask(image, label_space)
    for mask in (exclude, rule):
        if mask is not None:
            ids = ids.masked_fill(mask.cpu().bool(), label_space.ignore_index)
    return ids
