"""``label-probe``: CAMs fused with a pixel classifier fitted on the training split's image-level labels.

Why: ``seed-probe`` learns from the CAM's own confident pixels and so inherits the CAM's mistakes
(on WSSS4LUAD the tumour CAM is peaky and the stroma CAM covers "tissue that is not normal").
The labels themselves say more than the CAM seeds do: a window that lacks a class says that none
of its pixels belongs to it. This probe is fitted by multiple-instance learning on those labels:

- each training window is a bag of feature cells, each cell gets a softmax over the classes;
- a class *absent* from the window's label is pushed out of every cell of it
  (``-log(1 - p)`` averaged over the cells);
- a class *present* must win somewhere: the mean of its top ``top_fraction`` cells (2%, at least
  one cell) should be near 1 (``-log`` of it).

Because the classes compete per cell, the stroma-only windows teach what stroma looks like, and a
tumour-and-stroma window must put tumour in the cells least like stroma. The probe stays linear
(it cannot learn image-level shortcuts), on the backbone stages of output strides 4 and 8 plus
the image's optical density (``-log`` RGB, a stain-like colour code) blurred over 1, 3, 7 and 15
cells, all averaged onto the stride-8 grid (``grid``).

It therefore needs windows that lack some classes: it suits histology (and DeepGlobe's land
cover), and hurts street scenes, where nearly every crop holds road, sky and building together.

Fitted on :attr:`~wsss_domains.methods.fitting.FitContext.windows` where the run was trained with
``--labels-from-masks`` (the same images cut into windows of the training patch size at a
quarter-patch stride, each labelled from its mask by the loader's rule, e.g. a driving crop's
class needs 1% of it: the supervision training had, only more of it), else on the training samples
as they are. Applied per image: the probe's softmax over the
present classes, upsampled, and ``cam' = (1 - w) * cam + w * prob`` (``fuse_weight`` ``w`` = 0.5;
no re-normalisation, so a class the probe gives little area keeps little).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.domains.contract import BackgroundMode
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.fitting import FitContext
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.stage_probe import PixelProbe, StageProbe, new_probe

TOP_FRACTION = 0.02
GRID = 8
BLURS = (1, 3, 7, 15)  # widths, in cells of the first stride's grid, of the optical-density features


def optical_density(image: Tensor, size: tuple[int, int], blurs: tuple[int, ...] = BLURS) -> Tensor:
    """``1 x 3*len(blurs) x h x w``: ``-log`` RGB of a ``3 x H x W`` image in [0, 1], area-resized to
    ``size`` and box-blurred over each width in ``blurs`` (odd, in cells)."""
    od = -torch.log(image.float().clamp(1 / 255, 1.0))
    base = F.interpolate(od[None], size=size, mode="area")
    return torch.cat(
        [base if b == 1 else F.avg_pool2d(base, b, 1, b // 2, count_include_pad=False) for b in blurs], dim=1
    )


def top_mean(maps: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """``B x K``: per map, the mean of its highest ``fraction`` of valid cells (at least one).

    ``maps`` is ``B x K x h x w``, ``valid`` ``B x h x w`` (bags padded to one size).
    """
    flat = maps.masked_fill(~valid[:, None], float("-inf")).flatten(2)
    ranked = flat.sort(-1, descending=True).values
    count = (valid.flatten(1).sum(1) * fraction).clamp_min(1).long()
    keep = torch.arange(ranked.shape[-1], device=maps.device)[None, None] < count[:, None, None]
    return torch.where(keep, ranked, torch.zeros_like(ranked)).sum(-1) / keep.sum(-1)


def mil_loss(logits: Tensor, labels: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """The bag loss of :mod:`label_probe`: absent classes out of every cell, present ones on top somewhere.

    ``logits`` ``B x K x h x w``; ``labels`` ``B x K`` multi-hot (an always-present output, such as
    background, is simply 1 in every row); ``valid`` ``B x h x w`` marks the cells of each bag.
    """
    probs = logits.softmax(1)
    cells = valid[:, None].float()
    absent = -(torch.log1p(-probs.clamp_max(1 - 1e-6)) * cells).sum((2, 3)) / cells.sum((2, 3)).clamp_min(1)
    present = -torch.log(top_mean(probs, valid, fraction).clamp_min(1e-6))
    return ((absent * (1 - labels)).sum() + (present * labels).sum()) / labels.shape[0]


def fit_mil_probe(
    bags: Tensor,
    labels: Tensor,
    valid: Tensor,
    fraction: float = TOP_FRACTION,
    steps: int = 300,
    seed: int = 0,
    batch: int = 512,
) -> PixelProbe:
    """A :class:`PixelProbe` fitted by :func:`mil_loss` to ``B x D x h x w`` bags (Adam, seeded).

    Full-batch up to ``batch`` bags; beyond that each step draws ``batch`` bags at random, so that a
    step's cost stays bounded on large tile sets.
    """
    if bags.ndim != 4 or labels.shape[0] != bags.shape[0] or valid.shape != (bags.shape[0], *bags.shape[-2:]):
        raise ValueError(
            f"expected B x D x h x w bags, B x K labels and B x h x w valid cells, got "
            f"{tuple(bags.shape)}, {tuple(labels.shape)}, {tuple(valid.shape)}"
        )
    if not valid.any():
        raise ValueError("no valid cells to fit the probe on")
    cells = bags.movedim(1, -1)[valid]
    generator = torch.Generator().manual_seed(seed)
    probe, optimiser = new_probe(cells, labels.shape[1], generator)
    for _ in range(steps):
        optimiser.zero_grad()
        if bags.shape[0] > batch:
            pick = torch.randperm(bags.shape[0], generator=generator)[:batch]
            loss = mil_loss(probe(bags[pick]), labels[pick], valid[pick], fraction)
        else:
            loss = mil_loss(probe(bags), labels, valid, fraction)
        loss.backward()
        optimiser.step()
    return probe.eval()


@register_method
class LabelProbe(StageProbe):
    name = "label-probe"
    default_fit_images = 2000
    description = (
        "CAM fused with a linear pixel classifier on the stride-4/8 stages and the optical density, fitted by"
        " multiple-instance learning on the image-level labels of the run's training windows (absent classes"
        " out of every pixel; post hoc; options stride, grid, top_fraction, fuse_weight, fit_images, steps)."
    )

    def __init__(self, grid: int = GRID, top_fraction: float = TOP_FRACTION, **probe_options: Any) -> None:
        super().__init__(grid=grid, top_fraction=top_fraction, **probe_options)
        self.grid = int(grid)
        self.top_fraction = float(top_fraction)
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"label-probe: top_fraction must lie in (0, 1], got {self.top_fraction}")
        if min(self.fit_images, self.steps) < 1:
            raise ValueError("label-probe: fit_images and steps must be at least 1")
        if self.grid < self.strides[0] or self.grid % self.strides[0]:
            raise ValueError(
                f"label-probe: grid must be a multiple of the first stride {self.strides[0]}, got {self.grid}"
            )

    def _normalized_features(self, x: Tensor, prepared: Tensor | None = None) -> Tensor:
        """The stages and the optical density of ``prepared`` on the first stride's grid, pooled to ``grid``."""
        feats = super()._normalized_features(x)
        if prepared is None:
            raise ValueError("label-probe: the probe's colour features need the image before normalisation")
        colour = optical_density(prepared.to(feats.device), tuple(feats.shape[-2:]))  # type: ignore[arg-type]
        feats = torch.cat([feats, colour], dim=1)
        pool = self.grid // self.strides[0]
        return feats if pool == 1 else F.avg_pool2d(feats, pool, pool, ceil_mode=True)

    def fit_key(self) -> dict[str, Any]:
        """What the fitted probe depends on besides the run (the fit cache's key)."""
        return {
            "stride": list(self.strides),
            "grid": self.grid,
            "top_fraction": self.top_fraction,
            "fit_images": self.fit_images,
            "steps": self.steps,
        }

    def fit(self, context: FitContext) -> None:
        fitted_with = {**self.fit_key(), "windows": context.window_factory is not None}
        path = context.cache_path(self.name, fitted_with)
        outputs = self._outputs(context.label_space)
        if self._load(path, outputs):
            return
        bags, labels, valid = self.collect_bags(context)
        self.probe = fit_mil_probe(bags, labels, valid, self.top_fraction, self.steps)
        self.seen = labels.sum(0) > 0
        self._save(path)

    @torch.no_grad()
    def collect_bags(self, context: FitContext) -> tuple[Tensor, Tensor, Tensor]:
        """Padded ``B x D x h x w`` features, ``B x K`` labels and ``B x h x w`` valid cells of the windows."""
        dataset = context.windows if context.windows is not None else context.dataset
        label_space = context.label_space
        threshold = label_space.background_mode is BackgroundMode.THRESHOLD
        feats_list: list[Tensor] = []
        labels: list[Tensor] = []
        valids: list[Tensor] = []
        # Without any class a window teaches nothing, unless background is thresholded (then it is all background).
        wanted = (lambda present: True) if threshold else (lambda present: bool(present.any()))
        generator = torch.Generator().manual_seed(0)
        for item in self.fit_samples(context, dataset, generator, wanted):
            present, exclude = item.present, item.exclude
            feats = self._normalized_features(item.x, item.prepared)[0].cpu()
            if exclude is None:
                cells = torch.ones(feats.shape[-2:], dtype=torch.bool)
            else:
                area = F.interpolate(exclude[None, None].float().cpu(), size=feats.shape[-2:], mode="area")
                cells = area[0, 0] < 0.5
            if not cells.any():
                continue
            label = present.float().cpu()
            if threshold:  # background is in every image of a thresholded domain
                label = torch.cat([label, torch.ones(1)])
            feats_list.append(feats)
            labels.append(label)
            valids.append(cells)
        if not feats_list:
            raise ValueError("label-probe: the training split gave no labelled windows to fit on")
        h = max(f.shape[-2] for f in feats_list)
        w = max(f.shape[-1] for f in feats_list)
        bags = torch.zeros(len(feats_list), feats_list[0].shape[0], h, w)
        valid = torch.zeros(len(feats_list), h, w, dtype=torch.bool)
        for i, (f, v) in enumerate(zip(feats_list, valids, strict=True)):
            bags[i, :, : f.shape[-2], : f.shape[-1]] = f
            valid[i, : v.shape[-2], : v.shape[-1]] = v
        return bags, torch.stack(labels), valid

    @torch.no_grad()
    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        if self.probe is None:
            raise RuntimeError("label-probe: fit() must run before refine (the engine calls it)")
        keep = context.present.bool().to(cams.device)
        if not keep.any() or self.fuse_weight == 0.0:
            return cams
        probs, valid = self.probabilities(keep, context)
        valid = valid.to(cams.device)
        if not valid.any():
            return cams
        probs = F.interpolate(
            probs[None].to(cams.device), size=cams.shape[-2:], mode="bilinear", align_corners=False
        )
        out = cams.clone()
        w = self.fuse_weight
        out[valid] = (1 - w) * cams[valid] + w * probs[0][valid].to(cams.dtype)
        return out
