"""CAM fusion of two trained classifiers: AND, OR, and a precision-weighted mean (post hoc).

Why: two classifiers of different architecture (a CNN and a ViT, or two EfficientNet sizes) make
different mistakes; where both activate, a pixel is more likely right. Park & Shim ("Precision
matters: Precision-aware ensemble for weakly supervised semantic segmentation", AAAI-EIW 2024,
arXiv:2406.19638, ORANDNet) fuse the CAMs of ResNet-50 and ViT pixel-wise with OR and AND. Their
official code (github.com/engineerJPark/ORANDNet, ``metadata/dataset.py``: ``cam2or``,
``cam2and``) computes, on max-normalised CAMs ``a`` and ``b`` (the ViT's raised by 0.15,
"compensating threshold difference"):

    OR  = a + b - a * b        (probabilistic sum)
    AND = a * b                (product)

and then trains a small FCN per class channel that maps the OR CAM to the AND CAM (soft
cross-entropy, ``module/encdec_train.py``), followed by IRN. The "precision-aware" of the title is
that design (AND is the precise target, OR the complete input); the paper weighs neither model per
class. That FCN stage is **not** implemented here; this method is the fusion step only.

Options:

- ``second_run``: the second classifier's run folder (``wsss-domains train --out``), required;
  same foreground classes as the run. Its CAMs are computed for the same image, at the same scales
  and flips, with its own method's extractor, mean/std and training magnification, resized to the
  image and normalised as the engine normalises CAMs (``--cam-norm``).
- ``fusion``: ``and`` | ``or`` | ``precision``.
- ``logic``: ``product`` (the official code: AND = ``a*b``, OR = ``a+b-a*b``) or ``minmax``
  (Zadeh's fuzzy logic: AND = ``min(a, b)``, OR = ``max(a, b)``; with two identical runs both give
  the run's own CAMs back).
- ``second_offset``: added to the second run's CAMs before fusing (the official code uses 0.15 for
  its ViT; default 0).
- ``fusion=precision`` is **this toolkit's own approximation**, not the paper's method:
  ``w_c * a + (1 - w_c) * b`` with per-class weights from each classifier's soft classification
  precision on the run's training split (no pixel labels): for up to ``fit_images`` training
  samples, ``p`` = sigmoid of the classifier's logits at its training magnification, ``y`` = the
  image-level labels, ``P_c = (sum p_c * y_c + 1) / (sum p_c + 2)`` (Laplace-smoothed) and
  ``w_c = P1_c / (P1_c + P2_c)``. A class one classifier predicts where it is absent counts
  against that classifier's maps.

The fused maps are not re-normalised (as in the official code) and go on through the engine's
usual thresholding, so ``and`` (product) shrinks regions (higher precision) and ``or`` grows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.errors import UserError
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.fitting import FitContext
from wsss_domains.methods.registry import register_method
from wsss_domains.progress import progress_bar

FUSIONS = ("and", "or", "precision")
LOGICS = ("product", "minmax")
FIT_IMAGES = 256
RUNTIME_CACHE = "inference"  # as pipeline/pseudo_labels.py: the run folder's exported networks


def fuse_and(a: Tensor, b: Tensor, logic: str = "product") -> Tensor:
    """Pixel-wise AND of two CAMs in [0, 1]: product (ORANDNet's ``cam2and``) or minimum."""
    return a * b if logic == "product" else torch.minimum(a, b)


def fuse_or(a: Tensor, b: Tensor, logic: str = "product") -> Tensor:
    """Pixel-wise OR: probabilistic sum ``a + b - ab`` (ORANDNet's ``cam2or``) or maximum."""
    return a + b - a * b if logic == "product" else torch.maximum(a, b)


def soft_precision(probs: Tensor, labels: Tensor) -> Tensor:
    """Per-class Laplace-smoothed soft precision ``(sum p*y + 1) / (sum p + 2)`` over ``N x K`` samples."""
    probs, labels = probs.double(), labels.double()
    return ((probs * labels).sum(0) + 1.0) / (probs.sum(0) + 2.0)


def precision_weights(probs_a: Tensor, probs_b: Tensor, labels: Tensor) -> Tensor:
    """``K`` weights of the first classifier's maps: ``P_a / (P_a + P_b)`` (see the module docstring)."""
    pa, pb = soft_precision(probs_a, labels), soft_precision(probs_b, labels)
    return (pa / (pa + pb)).float()


def fuse_weighted(a: Tensor, b: Tensor, weights: Tensor) -> Tensor:
    """``w_c * a_c + (1 - w_c) * b_c`` for ``K x H x W`` maps and ``K`` weights."""
    w = weights.to(a.device, a.dtype)[:, None, None]
    return w * a + (1.0 - w) * b


class SecondRun:
    """The second classifier: its config, model and CAM extractor, on the first one's device."""

    def __init__(
        self, path: Path, domain: DomainPlugin | None, device: torch.device, **extractor_kwargs: Any
    ):
        from wsss_domains.methods.registry import create_method
        from wsss_domains.training.run import RunConfig, load_run

        self.path = path
        try:
            self.config: RunConfig
            self.config, self.model, modules = load_run(path, device)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"cam-fusion: second_run {path}: {exc}") from exc
        own = self.config.method
        method = Method() if own == CamFusion.name else create_method(own, **self.config.method_options)
        if domain is not None:
            method.setup(domain, self.config.mean, self.config.std)
        extractor_kwargs["base_scale"] = self.config.base_scale
        self.extractor = method.extractor(self.model, modules, **extractor_kwargs)
        self.runtime_tried = False

    def check_classes(self, label_space: LabelSpace) -> None:
        mine, theirs = list(label_space.foreground_names), list(self.config.foreground)
        if mine != theirs:
            raise UserError(
                f"cam-fusion: the second run {self.path} was trained on classes {theirs}, "
                f"but this run's label space has {mine}; both classifiers must share their classes"
            )

    def normalized(self, prepared: Tensor) -> Tensor:
        from wsss_domains.training.data import normalize

        return normalize(prepared, self.config.mean, self.config.std).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@register_method
class CamFusion(Method):
    name = "cam-fusion"
    description = (
        "CAMs of the run fused pixel-wise with a second run's (ORANDNet's AND/OR, Park & Shim 2024),"
        " or a per-class precision-weighted mean (this toolkit's approximation); post hoc (options"
        " second_run (required), fusion, logic, second_offset, fit_images)."
    )
    deviations = (
        "only ORANDNet's CAM fusion step: the FCN trained from the OR CAM to the AND CAM, IRN and the"
        " segmenter's curriculum are not implemented; second_offset defaults to 0 (the official code adds"
        " 0.15 to its ViT CAMs); logic=minmax (min/max) is offered beside the official product and"
        " probabilistic sum; fusion=precision (per-class weights from each classifier's soft"
        " classification precision on the training split) is the toolkit's own, not the paper's."
    )
    # Only fusion=precision fits; the instance attribute set in __init__ says whether this one does
    # (the class says yes so that a chain containing it calls fit).
    fits_training_split = True

    def __init__(
        self,
        second_run: str | None = None,
        fusion: str = "and",
        logic: str = "product",
        second_offset: float = 0.0,
        fit_images: int = FIT_IMAGES,
    ) -> None:
        super().__init__(
            second_run=second_run,
            fusion=fusion,
            logic=logic,
            second_offset=second_offset,
            fit_images=fit_images,
        )
        self.second_run = None if second_run is None else Path(second_run)
        self.fusion = str(fusion).lower()
        self.logic = str(logic).lower()
        self.second_offset = float(second_offset)
        self.fit_images = int(fit_images)
        if self.fusion not in FUSIONS:
            raise ValueError(f"cam-fusion: fusion must be one of {', '.join(FUSIONS)}, got '{fusion}'")
        if self.logic not in LOGICS:
            raise ValueError(f"cam-fusion: logic must be one of {', '.join(LOGICS)}, got '{logic}'")
        if self.fit_images < 1:
            raise ValueError(f"cam-fusion: fit_images must be at least 1, got {self.fit_images}")
        self.fits_training_split = self.fusion == "precision"  # type: ignore[misc]
        self.weights: Tensor | None = None
        self._first: CamExtractor | None = None
        self._second: SecondRun | None = None
        self._checked: LabelSpace | None = None

    def _second_path(self) -> Path:
        if self.second_run is None:
            raise UserError(
                "cam-fusion needs the second classifier's run folder: --method-option second_run=PATH "
                "(a folder made by `wsss-domains train`, e.g. with another --backbone)"
            )
        if not (self.second_run / "run.json").is_file():
            raise UserError(
                f"cam-fusion: second_run {self.second_run} is not a training run folder (no run.json)"
            )
        return self.second_run

    def setup(self, domain: DomainPlugin, mean: Any, std: Any) -> None:
        """Also checks that the second run exists, so a missing folder fails before any work."""
        super().setup(domain, mean, std)
        self._second_path()

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """The run's plain CAMs; the second run is loaded here with the same extractor settings."""
        self._first = super().extractor(model, modules, **kwargs)
        path = self._second_path()
        device = next(model.parameters()).device
        self._second = SecondRun(path, self.domain, device, **kwargs)
        k1, k2 = getattr(model, "num_classes", None), getattr(self._second.model, "num_classes", None)
        if k1 is not None and k2 is not None and k1 != k2:
            raise UserError(
                f"cam-fusion: the second run {path} has {k2} classes, this run {k1}; both must share their classes"
            )
        self._checked = None
        return self._first

    def _ready(self, label_space: LabelSpace) -> SecondRun:
        if self._second is None:
            raise RuntimeError("cam-fusion: call setup() and extractor() before refine (the engine does)")
        if self._checked is not label_space:
            self._second.check_classes(label_space)
            self._checked = label_space
        return self._second

    def second_cams(self, prepared: Tensor, size: tuple[int, int]) -> Tensor:
        """The second run's normalised ``K x H x W`` CAMs of an image prepared by the domain, in [0, 1]."""
        second = self._second
        assert second is not None
        if not second.runtime_tried:
            second.runtime_tried = True
            if self._first is not None and self._first.fast_cams is not None:  # the run's CAMs use ONNX
                second.extractor.use_runtime("onnx", cache=second.path / RUNTIME_CACHE)
        cams = second.extractor(second.normalized(prepared))
        if tuple(cams.shape[-2:]) != tuple(size):
            from torch.nn import functional as F

            cams = F.interpolate(cams[None], size=size, mode="bilinear", align_corners=False)[0]
        return cams

    def _prepared(self, context: RefineContext) -> Tensor:
        """The image after the domain's preprocessing: given, recovered from the classifier's input, or made."""
        if context.prepared is not None:
            return context.prepared
        if context.normalized is not None and self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=context.normalized.device)[:, None, None]
            std = torch.tensor(self.std, device=context.normalized.device)[:, None, None]
            return context.normalized * std + mean
        return context.domain.preprocess(context.image)

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        """The fused maps of the run's ``a`` and the second run's ``b`` (``K x H x W``)."""
        b = b + self.second_offset if self.second_offset else b
        if self.fusion == "and":
            return fuse_and(a, b, self.logic)
        if self.fusion == "or":
            return fuse_or(a, b, self.logic)
        if self.weights is None:
            raise RuntimeError(
                "cam-fusion: fusion=precision needs fit() on the training split first (the engine does)"
            )
        return fuse_weighted(a, b, self.weights)

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        self._ready(context.label_space)
        other = self.second_cams(self._prepared(context), tuple(cams.shape[-2:]))  # type: ignore[arg-type]
        return self.fuse(cams, other.to(cams.device, cams.dtype))

    def fit(self, context: FitContext) -> None:
        """fusion=precision: per-class weights from both classifiers' soft precision on the training split."""
        if self.fusion != "precision":
            return
        second = self._ready(context.label_space)
        stamp = (second.path / "model.pt").stat()
        key = {
            **self.options,
            "second_run": str(second.path.resolve()),
            "second": [stamp.st_size, stamp.st_mtime_ns],
        }
        path = context.cache_path(self.name, key)
        if path is not None and path.is_file():
            self.weights = torch.load(path, map_location="cpu", weights_only=True)
            return
        from wsss_domains.pseudo_labels.writer import image_labels
        from wsss_domains.training.data import normalize

        first = context.extractor
        device = next(first.model.parameters()).device
        probs_a, probs_b, labels = [], [], []
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(context.dataset), generator=generator)[: self.fit_images]  # type: ignore[arg-type]
        with torch.no_grad():
            for index in progress_bar(order.sort().values.tolist(), desc="cam-fusion precision"):
                sample = context.dataset[index]
                present = image_labels(sample, context.label_space, "auto")
                if present is None:
                    continue
                prepared = context.domain.preprocess(sample["image"])
                x1 = normalize(prepared, context.mean, context.std).to(device)
                probs_a.append(first.model(first.training_view(x1))["logits"][0].float().sigmoid().cpu())
                x2 = second.normalized(prepared)
                probs_b.append(
                    second.model(second.extractor.training_view(x2))["logits"][0].float().sigmoid().cpu()
                )
                labels.append(present.float().cpu())
        if not labels:
            raise UserError("cam-fusion: fusion=precision found no labelled training sample to fit on")
        self.weights = precision_weights(torch.stack(probs_a), torch.stack(probs_b), torch.stack(labels))
        if path is not None:
            from wsss_domains.data.io import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            weights = self.weights
            atomic_write(path, lambda tmp: torch.save(weights, tmp))
