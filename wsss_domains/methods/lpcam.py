"""``lpcam``: Local Prototype CAM (Chen & Sun, "Extracting Class Activation Maps from
Non-Discriminative Features as well", CVPR 2023), post hoc on the run's classifier.

Why: a CAM is the classifier's weight slid over the feature map, and that weight keeps only the
features that tell classes apart (a sheep's head), so the rest of the object (its legs, its body)
stays dark. LPCAM clusters *all* local features of a class over the training images into local
prototypes (head, leg, body, ...) and scores each pixel by its mean cosine similarity to them,
minus its similarity to the class's context prototypes (water beside a boat), which would
otherwise light up too.

Follows the official code (github.com/zhaozhengChen/LPCAM, ``step/make_lpcam.py``, VOC defaults;
``step_coco/make_lpcam.py`` where said):

Fit (once per run and options, cached in the run folder under ``fitted/``):

1. each training image's feature map of the classifier's last stage, the one its CAM head reads
   (``resnet50_cam.Net_CAM``'s ``stage4``), one forward pass, unflipped, at the training
   magnification (``save_feature``);
2. its CAMs, multi-scale and flipped as pseudo-labelling makes them and max-normalised per class
   (``make_cam``'s ``high_res``), resized to the feature grid by nearest neighbour; for every class
   ``c`` the image is labelled with, the cells with CAM ``c`` above ``select_thres`` (0.1) are
   features *of* ``c`` and the cells below it its *context* (``load_feature_select_and_cluster``);
3. per class, k-means with cosine distance (``kmeans_pytorch``: random points as initial centres,
   assignment by cosine, centres the mean of the raw, un-normalised members, an empty cluster
   re-seeded from a random point, stop when the squared sum of centre shifts falls below
   ``tol = 5``) into ``k`` (12) centres, separately for its features and its context;
4. a feature centre is a prototype of ``c`` where the softmax over classes of its logits under the
   classifier's head weight gives ``c`` more than ``class_thres`` (0.9) -- if none does, the
   centres of highest probability (``step_coco``'s fallback; VOC's code has none and would fail);
   a context centre is kept where that probability lies strictly between ``context_thres_low``
   (0.05) and ``context_thres`` (0.9).

Apply, per image and present class ``c`` with prototypes ``P`` and context ``Q``, at each of the
extractor's scales (``(1.0, 0.5, 1.5, 2.0)`` by default, like ``make_lpcam``): the feature map
``f`` of the image plus that of its mirror, flipped back; ``A = mean_p cos(f, p)``, and where ``Q``
is not empty ``A = ReLU(A - mean_q cos(f, q))``; ``A`` upsampled bilinearly; summed over scales,
divided by its maximum (``make_lpcam``). The official LPCAM *replaces* the CAM (``eval_cam`` and
``cam_to_ir_label`` read ``lpcam_out_dir``): ``fuse_weight`` 1.0. A lower ``fuse_weight`` ``w``
gives ``cam' = norm((1 - w) * cam + w * lpcam)`` as cam-proto fuses. Present classes without
prototypes (never labelled in the fitted images) keep their CAM. Labels are then assembled by the
engine (background threshold, arg-max) as for plain CAM; the official code thresholds at 0.3
(``cam_eval_thres``) the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor, normalize_per_class
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.fitting import FitContext, draw_fit_samples
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_proto import fuse_prototype_cams
from wsss_domains.training.data import normalize

log = logging.getLogger(__name__)

# The official defaults (make_lpcam.py: load_feature_select_and_cluster, VOC).
K = 12
SELECT_THRES = 0.1
CLASS_THRES = 0.9
CONTEXT_THRES = 0.9
CONTEXT_THRES_LOW = 0.05
TOL = 5.0  # kmeans_pytorch's stopping rule: (sum of centre shifts)^2 < tol
# Not in the official code (kmeans_pytorch runs until tol is met): a bound on the iterations.
MAX_ITER = 100
FUSE_WEIGHT = 1.0  # the official LPCAM replaces the CAM
FIT_IMAGES = 800
MAX_FEATURES = 4096  # per class and kind (features, context): a uniform sample of all cells


def cosine_kmeans(
    x: Tensor, k: int, tol: float = TOL, max_iter: int = MAX_ITER, generator: torch.Generator | None = None
) -> Tensor:
    """``min(k, N) x D`` centres of ``N x D`` points, k-means with cosine distance as ``kmeans_pytorch``.

    Initial centres are distinct random points; each point goes to the centre of highest cosine
    similarity; a centre becomes the mean of its members' *raw* (un-normalised) features; an empty
    cluster takes a random point; iterations stop when ``(sum_j |c_j - c_j'|)^2 < tol`` or after
    ``max_iter``. Seeded by ``generator`` (kmeans_pytorch draws from numpy's global state).
    """
    if x.ndim != 2:
        raise ValueError(f"expected N x D points, got {tuple(x.shape)}")
    x = x.float()
    n = x.shape[0]
    k = min(int(k), n)
    if k < 1:
        return x.new_zeros((0, x.shape[1]))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    unit = F.normalize(x, dim=1)
    for _ in range(max_iter):
        assign = (unit @ F.normalize(centres, dim=1).T).argmax(1)
        previous = centres
        sums = x.new_zeros(centres.shape).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        for j in (counts == 0).nonzero()[:, 0].tolist():
            centres[j] = x[int(torch.randint(n, (1,), generator=generator))]
        shift = (centres - previous).norm(dim=1).sum()
        if float(shift) ** 2 < tol:
            break
    return centres


def split_by_cam(
    features: Tensor, cam: Tensor, select_thres: float, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(N1 x D, N2 x D)``: the cells of ``features`` (``D x h x w``) whose ``cam`` (``H x W``,
    resized to ``h x w`` by nearest neighbour) lies above ``select_thres`` (the class's features)
    and below it (its context), as ``make_lpcam`` selects; a cell at exactly ``select_thres`` is in
    neither. Cells ``exclude`` (``H x W``, nearest) marks are in neither either.
    """
    grid = features.shape[-2:]
    mask = F.interpolate(cam[None, None].float(), size=grid, mode="nearest")[0, 0]
    flat = features.flatten(1).T
    fg, ctx = (mask > select_thres).flatten(), (mask < select_thres).flatten()
    if exclude is not None:
        keep = F.interpolate(exclude[None, None].float(), size=grid, mode="nearest")[0, 0] < 0.5
        keep = keep.flatten().to(fg.device)
        fg, ctx = fg & keep, ctx & keep
    return flat[fg], flat[ctx]


def select_prototypes(
    centres: Tensor,
    context_centres: Tensor,
    weight: Tensor,
    class_index: int,
    class_thres: float = CLASS_THRES,
    context_thres: float = CONTEXT_THRES,
    context_thres_low: float = CONTEXT_THRES_LOW,
) -> tuple[Tensor, Tensor]:
    """Class prototypes and context prototypes of class ``class_index`` among its k-means centres.

    ``weight`` is the classifier's ``K x D`` head; ``prob = softmax(centre @ weight.T)`` over the
    classes. Prototypes: ``prob[c] > class_thres``, else the centres of highest ``prob[c]``
    (``step_coco``); context: ``context_thres_low < prob[c] < context_thres``.
    """
    weight = weight.reshape(weight.shape[0], -1).float()
    protos = centres[:0]
    if centres.shape[0]:
        prob = F.softmax(centres.float() @ weight.T.to(centres.device), dim=1)[:, class_index]
        chosen = prob > class_thres
        if not chosen.any():
            chosen = prob > prob.max() - 1e-6
        protos = centres[chosen]
    context = context_centres[:0]
    if context_centres.shape[0]:
        prob = F.softmax(context_centres.float() @ weight.T.to(context_centres.device), dim=1)[:, class_index]
        context = context_centres[(prob > context_thres_low) & (prob < context_thres)]
    return protos, context


def lpcam_maps(features: Tensor, prototypes: Sequence[Tensor], contexts: Sequence[Tensor]) -> Tensor:
    """Un-normalised LPCAMs ``C x h x w`` of a ``D x h x w`` feature map, one per prototype set.

    ``A_c = mean_p cos(f, p)`` over ``prototypes[c]``; where ``contexts[c]`` is not empty,
    ``A_c = ReLU(A_c - mean_q cos(f, q))`` (``make_lpcam``). A class without prototypes gets zeros.
    """
    unit = F.normalize(features.float().flatten(1), dim=0)  # D x hw
    maps = []
    for protos, context in zip(prototypes, contexts, strict=True):
        if protos.shape[0] == 0:
            maps.append(unit.new_zeros(unit.shape[1]))
            continue
        att = (F.normalize(protos.float().to(unit.device), dim=1) @ unit).mean(0)
        if context.shape[0]:
            ctx = (F.normalize(context.float().to(unit.device), dim=1) @ unit).mean(0)
            att = (att - ctx).relu()
        maps.append(att)
    if not maps:
        return unit.new_zeros((0, *features.shape[-2:]))
    return torch.stack(maps).reshape(len(maps), *features.shape[-2:])


class LpcamExtractor(CamExtractor):
    """LPCAMs of some classes with a CAM extractor's scales, flip, magnification and tiling.

    Only the maps of one scaled image change (:meth:`_maps_at_size`): the feature maps of the image
    and its mirror are summed before the cosine (``make_lpcam``), not their maps. Normalise
    :meth:`maps` per class by its maximum, as ``make_lpcam`` does, whatever the CAMs' normalisation.
    """

    def __init__(self, base: CamExtractor, prototypes: Sequence[Tensor], contexts: Sequence[Tensor]) -> None:
        super().__init__(
            base.model,
            scales=base.scales,
            flip=base.flip,
            base_scale=base.base_scale,
            tile_size=base.tile_size,
            tile_overlap=base.tile_overlap,
        )
        self.prototypes = list(prototypes)
        self.contexts = list(contexts)

    def _maps_at_size(self, image: Tensor) -> Tensor:
        batch = image[None]
        if self.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        feats = self.model.features(batch).float()
        f = feats[0] + feats[1].flip(-1) if self.flip else feats[0]
        maps = lpcam_maps(f, self.prototypes, self.contexts)
        return F.interpolate(maps[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]

    def lpcams(self, image: Tensor) -> Tensor:
        """LPCAMs ``C x H x W`` in [0, 1] of a normalised ``3 x H x W`` image."""
        return normalize_per_class(self.maps(image)).clamp_min(0.0)


@register_method
class Lpcam(Method):
    name = "lpcam"
    description = (
        "LPCAM (Chen & Sun, CVPR 2023): per class, k-means (cosine) local prototypes of the last-stage features"
        " of the training split's CAM regions and of their context, filtered by the classifier head; a pixel's"
        " mean cosine to the prototypes minus that to the context (post hoc; options k, select_thres,"
        " class_thres, context_thres, context_thres_low, fuse_weight, fit_images, max_features)."
    )
    deviations = (
        "the run's backbone (EfficientNet-Lite by default) instead of ResNet-50; features are fitted on up to"
        " fit_images training samples with at most max_features cells per class and kind, drawn uniformly,"
        " instead of every cell of every train.txt image; k-means is a seeded torch port of kmeans_pytorch's"
        " cosine k-means capped at 100 iterations; a class with no centre above class_thres keeps its most"
        " probable ones (step_coco's rule); excluded pixels (glass, no-data) are neither features nor context;"
        " CAMs for selection are max-normalised even for a sigmoid-normalised run; maps are resampled as the"
        " toolkit's CAMs (feature grid to scaled image to image, tiled when large), clamped at 0; in rasters,"
        " normalised per window"
    )
    fits_training_split = True

    def __init__(
        self,
        k: int = K,
        select_thres: float = SELECT_THRES,
        class_thres: float = CLASS_THRES,
        context_thres: float = CONTEXT_THRES,
        context_thres_low: float = CONTEXT_THRES_LOW,
        fuse_weight: float = FUSE_WEIGHT,
        fit_images: int = FIT_IMAGES,
        max_features: int = MAX_FEATURES,
    ) -> None:
        super().__init__(
            k=k,
            select_thres=select_thres,
            class_thres=class_thres,
            context_thres=context_thres,
            context_thres_low=context_thres_low,
            fuse_weight=fuse_weight,
            fit_images=fit_images,
            max_features=max_features,
        )
        self.k = int(k)
        self.select_thres = float(select_thres)
        self.class_thres = float(class_thres)
        self.context_thres = float(context_thres)
        self.context_thres_low = float(context_thres_low)
        self.fuse_weight = float(fuse_weight)
        self.fit_images = int(fit_images)
        self.max_features = int(max_features)
        if min(self.k, self.fit_images, self.max_features) < 1:
            raise ValueError("lpcam: k, fit_images and max_features must be at least 1")
        if not 0.0 <= self.fuse_weight <= 1.0:
            raise ValueError(f"lpcam: fuse_weight must lie in [0, 1], got {self.fuse_weight}")
        for option in ("select_thres", "class_thres", "context_thres", "context_thres_low"):
            if not 0.0 <= getattr(self, option) <= 1.0:
                raise ValueError(f"lpcam: {option} must lie in [0, 1], got {getattr(self, option)}")
        self._extractor: CamExtractor | None = None
        # Fitted state: per class, the k-means centres of its features and of its context ...
        self.centres: list[Tensor] | None = None
        self.context_centres: list[Tensor] | None = None
        # ... and those the classifier head selects (see :func:`select_prototypes`).
        self.prototypes: list[Tensor] | None = None
        self.contexts: list[Tensor] | None = None

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """Plain CAMs; the extractor is kept because :meth:`refine` reads its model and settings."""
        self._extractor = super().extractor(model, modules, **kwargs)
        return self._extractor

    # -- fit ---------------------------------------------------------------------------------

    def fit(self, context: FitContext) -> None:
        fitted_with = {
            "k": self.k,
            "select_thres": self.select_thres,
            "fit_images": self.fit_images,
            "max_features": self.max_features,
        }
        path = context.cache_path(self.name, fitted_with)
        if not self._load(path):
            features, contexts = self.collect_features(context)
            self.centres, self.context_centres = [], []
            for c, (fg, ctx) in enumerate(zip(features, contexts, strict=True)):
                self.centres.append(cosine_kmeans(fg, self.k, generator=torch.Generator().manual_seed(2 * c)))
                self.context_centres.append(
                    cosine_kmeans(ctx, self.k, generator=torch.Generator().manual_seed(2 * c + 1))
                )
            self._save(path)
        self.select(head_weight(context.extractor.model))

    def select(self, weight: Tensor) -> None:
        """Pick each class's prototypes and context among its fitted centres (see :func:`select_prototypes`)."""
        if self.centres is None or self.context_centres is None:
            raise RuntimeError("lpcam: fit() must run before refine (the engine calls it)")
        self.prototypes, self.contexts = [], []
        for c, (centres, context) in enumerate(zip(self.centres, self.context_centres, strict=True)):
            protos, ctx = select_prototypes(
                centres,
                context,
                weight.detach().cpu(),
                c,
                self.class_thres,
                self.context_thres,
                self.context_thres_low,
            )
            self.prototypes.append(protos)
            self.contexts.append(ctx)

    def _fit_samples(
        self, context: FitContext, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, Any]]:
        """``(x, present, exclude)`` of up to ``fit_images`` labelled training samples (seeded draw)."""
        samples = draw_fit_samples(
            context,
            context.dataset,
            self.fit_images,
            generator,
            lambda p: bool(p.bool().any()),
            f"{self.name} fit",
        )
        for s in samples:
            yield s.x, s.present, s.exclude

    @torch.no_grad()
    def collect_features(self, context: FitContext) -> tuple[list[Tensor], list[Tensor]]:
        """Per class, ``N x D`` last-stage features of its CAM regions and of its context across the split.

        At most ``max_features`` of each, a uniform sample of all such cells (each cell draws a
        random key; the smallest keys are kept).
        """
        generator = torch.Generator().manual_seed(0)
        extractor = context.extractor
        model = extractor.model
        device = next(model.parameters()).device
        num_classes = len(context.label_space.foreground)
        kept: list[list[tuple[Tensor, Tensor] | None]] = [[None, None] for _ in range(num_classes)]
        for x, present, exclude in self._fit_samples(context, generator):
            x = x.to(device)
            feats = model.features(extractor.training_view(x))[0].float()
            cams = selection_cams(extractor, x)
            for c in present.bool().nonzero()[:, 0].tolist():
                parts = split_by_cam(feats, cams[c], self.select_thres, exclude)
                for kind, cells in enumerate(parts):
                    keys = torch.rand(cells.shape[0], generator=generator)
                    kept[c][kind] = _keep_smallest(kept[c][kind], cells.cpu(), keys, self.max_features)
        dim = _feature_dim(model)
        features = [
            kept[c][0][0] if kept[c][0] is not None else torch.zeros(0, dim) for c in range(num_classes)
        ]
        contexts = [
            kept[c][1][0] if kept[c][1] is not None else torch.zeros(0, dim) for c in range(num_classes)
        ]
        if all(f.shape[0] == 0 for f in features):
            raise ValueError("lpcam: the training split gave no CAM features (no labelled images?)")
        return features, contexts

    def _load(self, path: Path | None) -> bool:
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.centres, self.context_centres = list(state["centres"]), list(state["context_centres"])
        log.info("%s: fitted centres loaded from %s", self.name, path)
        return True

    def _save(self, path: Path | None) -> None:
        if path is None or self.centres is None:
            return
        from wsss_domains.data.io import atomic_write

        state = {"centres": self.centres, "context_centres": self.context_centres}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    # -- apply -------------------------------------------------------------------------------

    @torch.no_grad()
    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        if self.prototypes is None or self.contexts is None:
            raise RuntimeError("lpcam: fit() must run before refine (the engine calls it)")
        if self._extractor is None or self.mean is None or self.std is None:
            raise RuntimeError("lpcam: call setup() and extractor() before refine (the engine does)")
        has = torch.tensor([p.shape[0] > 0 for p in self.prototypes], dtype=torch.bool)
        keep = context.present.bool().cpu() & has
        if not keep.any() or self.fuse_weight == 0.0:
            return cams
        chosen = keep.nonzero()[:, 0].tolist()
        x = context.normalized
        if x is None:
            prepared = (
                context.prepared if context.prepared is not None else context.domain.preprocess(context.image)
            )
            x = normalize(prepared, self.mean, self.std)
        device = next(self._extractor.model.parameters()).device
        lp = LpcamExtractor(
            self._extractor, [self.prototypes[c] for c in chosen], [self.contexts[c] for c in chosen]
        )
        maps = lp.lpcams(x.to(device)).to(cams.device, cams.dtype)
        if maps.shape[-2:] != cams.shape[-2:]:
            maps = F.interpolate(maps[None], size=cams.shape[-2:], mode="bilinear", align_corners=False)[0]
        full = torch.zeros_like(cams)
        full[chosen] = maps
        valid = keep.to(cams.device)
        if self.fuse_weight == 1.0:
            out = cams.clone()
            out[valid] = full[valid]
            return out
        return fuse_prototype_cams(cams, full, valid, self.fuse_weight)


def head_weight(model: nn.Module) -> Tensor:
    """The classifier's ``K x D`` CAM head (a bias-free 1x1 convolution, as ``Net_CAM.classifier``)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Conv2d):
        raise TypeError("lpcam needs a CAM classifier with a 1x1 convolution head (CamClassifier)")
    return head.weight.reshape(head.weight.shape[0], -1)


def selection_cams(extractor: CamExtractor, x: Tensor) -> Tensor:
    """Multi-scale CAMs in [0, 1] by per-class maximum (``make_cam``'s ``high_res``), whatever the
    extractor's own normalisation."""
    if extractor.normalization == "max":
        return extractor(x)
    return normalize_per_class(extractor.maps(x).clamp_min(0.0))


def _keep_smallest(
    held: tuple[Tensor, Tensor] | None, cells: Tensor, keys: Tensor, cap: int
) -> tuple[Tensor, Tensor]:
    """``held`` plus ``cells`` (with their random ``keys``), reduced to the ``cap`` smallest keys."""
    if held is not None:
        cells, keys = torch.cat([held[0], cells]), torch.cat([held[1], keys])
    if keys.numel() > cap:
        keep = keys.topk(cap, largest=False).indices
        cells, keys = cells[keep], keys[keep]
    return cells, keys


def _feature_dim(model: nn.Module) -> int:
    return int(head_weight(model).shape[1])
