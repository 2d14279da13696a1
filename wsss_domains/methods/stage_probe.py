"""What the pixel-probe methods (``seed-probe``, ``label-probe``) share: the probe and its input.

Why: both fit a small per-pixel classifier once, on the run's training split, to the shallow
backbone stages (output strides 4 and 8), which still describe local texture and colour where the
last stage has learnt to tell images apart; they differ only in what they fit it to. The probe's
input, its standardised linear layer, the option checks and the fitted-state cache live here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import BackgroundMode, DomainPlugin, LabelSpace
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.fitting import FitContext, FitSample, draw_fit_samples
from wsss_domains.models.stages import stage_at_stride
from wsss_domains.training.data import normalize

log = logging.getLogger(__name__)

STRIDES = (4, 8)
FUSE_WEIGHT = 0.5
STEPS = 300
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4


def parse_strides(value: object, method: str = "seed-probe") -> tuple[int, ...]:
    """Option ``stride``: one output stride, or several (``"4,8"``, ``[4, 8]``) whose stages are
    concatenated on the first one's grid."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        strides = tuple(int(v) for v in items)
    except ValueError as exc:
        raise ValueError(f"{method}: stride must be integers like 8 or '4,8', got {value!r}") from exc
    if not strides or min(strides) < 1:
        raise ValueError(f"{method}: stride must be positive integers, got {value!r}")
    return strides


class PixelProbe(nn.Module):
    """Standardisation then a linear layer: per-cell logits ``B x C x h x w`` from ``B x D x h x w``."""

    def __init__(self, mean: Tensor, std: Tensor, num_outputs: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(mean.numel(), num_outputs)

    def forward(self, features: Tensor) -> Tensor:
        x = (features.movedim(1, -1) - self.mean) / self.std
        return self.linear(x).movedim(-1, 1)


def new_probe(
    cells: Tensor, num_outputs: int, generator: torch.Generator
) -> tuple[PixelProbe, torch.optim.Optimizer]:
    """A probe standardising like ``cells`` (``N x D``), with near-zero initial weights, and its optimiser."""
    probe = PixelProbe(cells.mean(0), cells.std(0).clamp_min(1e-5), num_outputs)
    with torch.no_grad():
        nn.init.normal_(probe.linear.weight, std=0.01, generator=generator)
        probe.linear.bias.zero_()
    return probe, torch.optim.Adam(probe.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


class StageProbe(Method):
    """Base of the methods that fit a :class:`PixelProbe` on the training split (post hoc)."""

    fits_training_split = True
    default_fit_images: ClassVar[int] = 800

    def __init__(
        self,
        stride: int | str | Sequence[int] = STRIDES,
        fuse_weight: float = FUSE_WEIGHT,
        steps: int = STEPS,
        fit_images: int | None = None,
        **options: Any,
    ) -> None:
        fit_images = self.default_fit_images if fit_images is None else fit_images
        super().__init__(
            stride=stride, fuse_weight=fuse_weight, steps=steps, fit_images=fit_images, **options
        )
        self.strides = parse_strides(stride, self.name)
        self.fuse_weight = float(fuse_weight)
        self.steps = int(steps)
        self.fit_images = int(fit_images)
        if not 0.0 <= self.fuse_weight <= 1.0:
            raise ValueError(f"{self.name}: fuse_weight must lie in [0, 1], got {self.fuse_weight}")
        self._extractor: CamExtractor | None = None
        self.probe: PixelProbe | None = None
        self.seen: Tensor | None = None  # outputs the probe had training pixels of
        self.stages: list[int] | None = None

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """Plain CAMs; the extractor is kept because fitting and :meth:`refine` read its stages."""
        self._extractor = super().extractor(model, modules, **kwargs)
        self.stages = [stage_at_stride(model.backbone, stride) for stride in self.strides]
        return self._extractor

    @staticmethod
    def _outputs(label_space: LabelSpace) -> int:
        """Probe outputs: the foreground classes, plus background where the domain thresholds it."""
        extra = 1 if label_space.background_mode is BackgroundMode.THRESHOLD else 0
        return len(label_space.foreground) + extra

    def _features(self, image: Tensor, domain: DomainPlugin, context: RefineContext | None = None) -> Tensor:
        """Probe input ``1 x D x h x w`` of a raw ``3 x H x W`` image in [0, 1] (reusing the engine's
        preprocessed and normalised copies where the context holds them)."""
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{self.name}: call setup() and extractor() first (the engine does)")
        prepared = context.prepared if context is not None else None
        if prepared is None:
            prepared = domain.preprocess(image)
        x = context.normalized if context is not None else None
        if x is None:
            x = normalize(prepared, self.mean, self.std)
        return self._normalized_features(x, prepared)

    def _normalized_features(self, x: Tensor, prepared: Tensor | None = None) -> Tensor:
        """Probe input of a normalised image: the stages concatenated on the first one's grid.

        ``prepared`` (the image in [0, 1] before normalisation) is for subclasses that add colour.
        """
        if self._extractor is None or self.stages is None:
            raise RuntimeError(f"{self.name}: call setup() and extractor() first (the engine does)")
        device = next(self._extractor.model.parameters()).device
        feats = self._extractor.stages_features(x.to(device), self.stages)
        size = feats[0].shape[-2:]  # the first stride's grid
        return torch.cat(
            [
                f
                if f.shape[-2:] == size
                else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                for f in feats
            ],
            dim=1,
        )

    def fit_samples(
        self,
        context: FitContext,
        dataset: Any,
        generator: torch.Generator,
        wanted: Callable[[Tensor], bool],
    ) -> Iterator[FitSample]:
        """Up to ``fit_images`` samples of ``dataset`` whose labels are ``wanted`` (see
        :func:`~wsss_domains.methods.fitting.draw_fit_samples`)."""
        return draw_fit_samples(context, dataset, self.fit_images, generator, wanted, f"{self.name} fit")

    def _load(self, path: Path | None, outputs: int) -> bool:
        """Restore a cached fit; False where there is none."""
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.seen = state.pop("seen")
        self.probe = PixelProbe(state["mean"], state["std"], outputs)
        self.probe.load_state_dict(state)
        log.info("%s: fitted probe loaded from %s", self.name, path)
        return True

    def _save(self, path: Path | None) -> None:
        if path is None or self.probe is None:
            return
        from wsss_domains.data.io import atomic_write

        state = {**self.probe.state_dict(), "seen": self.seen}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    @torch.no_grad()
    def probabilities(self, present: Tensor, context: RefineContext) -> tuple[Tensor, Tensor]:
        """The probe's softmax over the present classes (and background where thresholded), ``K x h x w``
        on its own grid, and which of the ``K`` foreground classes it can speak for."""
        if self.probe is None or self.seen is None:
            raise RuntimeError(f"{self.name}: fit() must run before refine (the engine calls it)")
        keep = present.bool()
        feats = self._features(context.image, context.domain, context)
        logits = self.probe.to(feats.device)(feats)[0]
        allowed = torch.cat(
            [keep.to(logits.device), keep.new_ones(logits.shape[0] - keep.numel()).to(logits.device)]
        )
        logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
        probs = logits.softmax(0)[: keep.numel()]
        valid = keep & self.seen[: keep.numel()].to(keep.device)
        return probs, valid
