"""MoRe: class-patch attention needs regularisation (Yang et al., AAAI 2025), on Vision Transformers.

Why: a ViT with one class token per class localises each class by how its token relates to the
patch tokens (a localisation attention map, LAM), sharper than a CAM but prone to artifacts: patches
of no relevance to a class light up. MoRe regularises those class-patch relations twice: a graph
module (Graph Category Representation, GCR) lets each class token gather only from the tokens it is
most related to, and CAM-derived labels supervise the relations directly (Localization-informed
Regularization, LIR: certain patches of a class pulled towards its token, uncertain patches towards
the image's class tokens and away from the absent ones). It is ToCo's network (auxiliary classifier,
patch token contrast, segmentation head on PAR-refined labels) with these additions.

Checked against zwyang6/MoRe (``scripts/train_voc.py``, ``model/model_mal.py``, ``model/GCA.py``,
``model/backbone/mat_vit.py``, ``model/losses.py``, ``utils/camutils.py``, ``tools/infer_lam.py``):

* tokens: 4 regularisation tokens then one class token per foreground class, prepended to the patch
  tokens with positional embeddings of their own (``MATformer``); started as the official reload
  does from a pretrained ViT: every token a copy of the backbone's class token, the class tokens'
  positional embeddings copies of its class-token position, the regularisation tokens' drawn from a
  truncated normal of standard deviation 1; the backbone's own class token is not used;
* GCR (``graphic_cls_aggregation``): head and tail projections, each class token's top
  ``int(0.5 C)`` neighbours among the class tokens and the (detached) final patch tokens, a
  softmax-gated blend, a knowledge-attention weight ``(Σ_l n_l)(Σ_m g_m)`` (the official einsum
  ``ijkl,ijkm->ijk`` sums each factor separately, transcribed as such), sum and product
  aggregations through two linear layers with LeakyReLU, LayerNorm;
* losses, weights as ``train_voc.py``: classification (the engine's) and auxiliary classification on
  the tokens of block ``aux_layer`` = -3, each 1; class-token distinctness ``multi_cls_loss``
  (cross-entropy of the cosine matrix of the GCR class tokens over 0.07 against the identity), 1;
  patch token contrast (ToCo's PTC on the auxiliary CAMs at 0.7 / 0.25), 0.3; CLE (``CRELoss_neg``,
  temperature 0.5), 0.2: for each present class, ``-log`` of the softmax over all patches of the
  similarity between its unit GCR token and the detached, unnormalised final patch tokens, averaged
  over the patches labelled with the class; UNE (``URELoss_neg``), 0.1: up to 8 uncertain patch
  tokens per image (6x6 windows, official indexing) pulled to the present classes' detached tokens
  and pushed from the absent ones by absolute cosine; segmentation (LargeFOV on the final tokens,
  ToCo's balanced cross-entropy on PAR-refined CAM labels at 0.7 / 0.25), 0.12 after the first 10%
  of training (2000 of 20000 iterations);
* CLE's labels come from the auxiliary CAMs at 0.5 / 0.25 and UNE's at 0.7 / 0.25 for the first half
  of training (``cam2mask`` = 10000), then both from the final CAMs at 0.6 / 0.35; training CAMs at
  scales 1, 0.5, 0.75, 1.5 with mirrors (``multi_scale_cam2``);
* pseudo-labels: the LAM, ``Σ_d x_d(p) t_{k,d}`` of the final patch tokens and the GCR class
  tokens, summed over the engine's scales and flips, shifted to a minimum of 0 and divided by its
  maximum (+1e-5) per class (``multi_scale_lam2``).

Deviations: the dense-CRF energy loss (weight 0.05) is not reproduced (it needs a compiled bilateral
filter, as for ToCo); the engine sums an image and its mirror where the official takes their
maximum; GCR keeps at least one neighbour (a domain with a single class would get none); an image
with no uncertain token and none to fill in adds nothing to UNE (the official would fail); window by
window raster pseudo-labelling divides the LAM by its maxima over windows without the minimum shift.
The tokens train at the backbone's learning rate (the official encoder group), the GCR and the heads
at the engine's head rate (official: ten times the backbone's); the backbone's own class token is
frozen, being unused. Start from a ViT with ImageNet weights where you have one (none ship here);
``--pooling gmp`` is MoRe's pooling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.cam.extract import CamExtractor, min_max_per_class
from wsss_domains.errors import UserError
from wsss_domains.methods.base import Method
from wsss_domains.methods.online_labels import (
    IGNORE_INDEX,
    multi_scale_cams,
    refined_labels,
    segmentation_loss,
)
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.seg_head import LARGEFOV_CHANNELS, LargeFov
from wsss_domains.methods.toco import affinity_mask, cam_labels, patch_token_contrast
from wsss_domains.models.vit import VitCamClassifier
from wsss_domains.refine.par import PixelAdaptiveRefiner

REGISTER_TOKENS = 4
AUX_LAYER = -3
GCR_RATIO = 0.5
DISTINCT_TEMPERATURE = 0.07
CONTRAST_TEMPERATURE = 0.5
WEIGHTS = {"cls_aux": 1.0, "distinct": 1.0, "ptc": 0.3, "cle": 0.2, "une": 0.1, "seg": 0.12}
CAM_SCALES = (1.0, 0.5, 0.75, 1.5)
WARMUP = 0.1  # 2000 of 20000 iterations without the segmentation loss
SWITCH = 0.5  # cam2mask: 10000 of 20000 iterations on the auxiliary CAMs' labels
THRESHOLDS = {"ptc": (0.7, 0.25), "cle_early": (0.5, 0.25), "une_early": (0.7, 0.25), "late": (0.6, 0.35)}
UNCERTAIN_TOKENS = 8
UNCERTAIN_KERNEL = 6


# -- the network's additions ---------------------------------------------------------------------
class ClassTokens(nn.Module):
    """The regularisation and class tokens with their positional embeddings (``MATformer``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, registers: int = REGISTER_TOKENS) -> None:
        super().__init__()
        dim, count = backbone.embed_dim, registers + num_classes
        self.registers = registers
        self.tokens = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, count, dim), std=0.02))
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, count, dim), std=0.02))
        cls_token = getattr(backbone, "cls_token", None)
        with torch.no_grad():
            if cls_token is not None:  # the official reload from a pretrained ViT
                self.tokens.copy_(cls_token.expand(-1, count, -1))
                pos_embed = getattr(backbone, "pos_embed", None)
                if pos_embed is not None and not getattr(backbone, "no_embed_class", False):
                    self.pos[:, registers:] = pos_embed[:, :1]
                    self.pos[:, :registers] = nn.init.trunc_normal_(torch.zeros(1, registers, dim))


class GraphCategoryRepresentation(nn.Module):
    """GCR (``graphic_cls_aggregation``): class tokens that gather from their strongest neighbours."""

    def __init__(self, dim: int, ratio: float = GCR_RATIO, dropout: float = 0.0) -> None:
        super().__init__()
        self.ratio = ratio
        self.head_proj = nn.Linear(dim, dim)
        self.tail_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.activation = nn.LeakyReLU()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.scale = dim**-0.5

    def forward(self, class_tokens: Tensor, patch_tokens: Tensor) -> Tensor:
        """``B x C x D`` class tokens and ``B x N x D`` patch tokens -> ``B x C x D`` class tokens."""
        b, c, d = class_tokens.shape
        k = max(1, int(self.ratio * c))
        heads = self.head_proj(class_tokens)
        tails = self.tail_proj(torch.cat([class_tokens, patch_tokens.detach()], dim=1))
        weight, index = ((heads * self.scale) @ tails.transpose(1, 2)).topk(k, dim=-1)  # B x C x k
        neighbours = torch.gather(
            tails[:, None].expand(-1, c, -1, -1), 2, index[..., None].expand(-1, -1, -1, d)
        )  # B x C x k x D
        prob = weight.softmax(dim=2)[..., None]
        blended = (1 - prob) * heads[:, :, None] + prob * neighbours
        gate = torch.tanh(heads[:, :, None] + blended)
        knowledge = (neighbours.sum(-1) * gate.sum(-1)).softmax(dim=2)  # the official einsum
        gathered = (knowledge[..., None] * neighbours).sum(2)
        summed = self.activation(self.linear1((heads + gathered) * 0.1 + class_tokens))
        product = self.activation(self.linear2(heads * gathered * 0.1 + class_tokens))
        return self.norm(self.dropout(summed + product))


def token_pass(
    model: VitCamClassifier, tokens: ClassTokens, x: Tensor, aux_layer: int = AUX_LAYER
) -> tuple[Tensor, Tensor, Tensor]:
    """The ViT with MoRe's tokens: class tokens ``B x C x D`` and the final and block-``aux_layer``
    patch maps ``B x D x h x w`` (final tokens after the last norm, the auxiliary ones before)."""
    vit = model.backbone
    b = x.shape[0]
    embedded = vit._pos_embed(vit.patch_embed(x))[:, vit.num_prefix_tokens :]
    extra = (tokens.tokens + tokens.pos).expand(b, -1, -1)
    h = vit.norm_pre(torch.cat([extra, embedded], dim=1))
    outputs = []
    for block in vit.blocks:
        h = block(h)
        outputs.append(h)
    final = vit.norm(h)
    n = extra.shape[1]
    grid = vit.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))

    def as_map(t: Tensor) -> Tensor:
        return t[:, n:].transpose(1, 2).reshape(b, -1, *grid)

    return final[:, tokens.registers : n], as_map(final), as_map(outputs[aux_layer])


def localisation_maps(features: Tensor, class_tokens: Tensor) -> Tensor:
    """LAM ``B x C x h x w``: each patch token's dot product with each class token."""
    return torch.einsum("bdhw,bkd->bkhw", features, class_tokens)


# -- losses ----------------------------------------------------------------------------------------
def distinct_tokens_loss(class_tokens: Tensor, temperature: float = DISTINCT_TEMPERATURE) -> Tensor:
    """``multi_cls_loss``: each unit class token closest to itself among the image's class tokens."""
    unit = F.normalize(class_tokens, dim=-1)
    logits = unit @ unit.transpose(1, 2) / temperature
    target = torch.arange(class_tokens.shape[1], device=class_tokens.device).expand(class_tokens.shape[0], -1)
    return F.cross_entropy(logits, target)


def certain_patches_loss(
    class_tokens: Tensor, features: Tensor, token_labels: Tensor, labels: Tensor, temperature: float
) -> Tensor:
    """``CRELoss_neg``: a present class's token should single out the patches labelled with it."""
    unit = F.normalize(class_tokens, dim=-1, eps=1e-8)
    logits = unit @ features.detach().flatten(2) / temperature  # B x C x N
    log_eps = logits.new_full((1,), 1e-4).log()
    total = logits.new_zeros(())
    for i in range(labels.shape[0]):
        for k in labels[i].nonzero().flatten().tolist():
            row = logits[i, k]
            nll = torch.logsumexp(torch.cat([row, log_eps]), dim=0) - row  # -log(e^l / (Σ e^l + 1e-4))
            flag = (token_labels[i].flatten() == k + 1).to(row.dtype)
            total = total + (flag * nll).sum() / (flag.sum() + 1e-4)
    return total / labels.shape[0]


def region_of_labels(token_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``mask2roi``: 1 where a token is uncertain (ignored), 2 where it has a class, 0 background."""
    roi = torch.zeros_like(token_labels)
    roi[token_labels == ignore_index] = 1
    roi[(token_labels >= 1) & (token_labels != ignore_index)] = 2
    return roi


def uncertain_tokens(
    features: Tensor, roi: Tensor, count: int = UNCERTAIN_TOKENS, kernel: int = UNCERTAIN_KERNEL
) -> list[Tensor]:
    """``uncertain_kernel_search``: per image, up to ``count`` tokens ``n x D`` of uncertain windows.

    As the official code: a position ``(y, x)`` of the uncertain part of the map without a border of
    ``kernel // 2`` qualifies when the ``kernel x kernel`` window starting at ``(y, x)`` of the whole
    map sums to at least 1.2 per cell, and the token taken is the one at ``(y, x)``; with ``count`` or
    fewer, ``(count - n) // 4`` tokens of confident foreground (any position if too few) are added.
    """
    b, _, h, w = features.shape
    m = kernel // 2
    out = []
    for i in range(b):
        inner = roi[i, m : h - m, m : w - m]
        chosen = []
        for y, x in (inner == 1).nonzero().tolist():
            if float(roi[i, y : y + kernel, x : x + kernel].sum()) / (kernel * kernel) >= 1.2:
                chosen.append(features[i, :, y, x])
        if len(chosen) > count:
            picked = torch.randperm(len(chosen))[:count].tolist()
            tokens = torch.stack(chosen)[picked]
        else:
            extra = (count - len(chosen)) // 4
            positions = (inner == 2).nonzero()
            if positions.shape[0] < extra:
                positions = (inner >= 0).nonzero()
            for y, x in positions[torch.randperm(positions.shape[0])[:extra]].tolist():
                chosen.append(features[i, :, y, x])
            tokens = torch.stack(chosen) if chosen else features.new_zeros(0, features.shape[1])
        out.append(tokens)
    return out


def uncertain_patches_loss(
    class_tokens: Tensor, features: Tensor, token_labels: Tensor, labels: Tensor
) -> Tensor:
    """``URELoss_neg``: uncertain tokens near (absolute cosine 1) the present classes' tokens, far
    (cosine 0) from the absent ones', averaged over the batch's chosen tokens."""
    unit_tokens = F.normalize(class_tokens, dim=-1, eps=1e-8).detach()
    unit_features = F.normalize(features, dim=1, eps=1e-8)
    chosen = uncertain_tokens(unit_features, region_of_labels(token_labels))
    total, n = features.new_zeros(()), 0
    absent = 1 - labels
    for i, tokens in enumerate(chosen):
        if tokens.shape[0] == 0:
            continue
        cos = (tokens @ unit_tokens[i].T).abs()  # n x C
        pull = 1 - (cos * labels[i]).sum(-1) / (labels[i].sum() + 1)
        push = (cos * absent[i]).sum(-1) / (absent[i].sum() + 1)
        total = total + (0.5 * pull + 0.5 * push).sum()
        n += tokens.shape[0]
    return total / n if n else features.sum() * 0.0


# -- pseudo-labels ---------------------------------------------------------------------------------
class LamExtractor(CamExtractor):
    """The LAM of the GCR class tokens in place of the CAM; min-max scaled per class."""

    def __init__(self, model: nn.Module, modules: nn.ModuleDict, aux_layer: int, **kwargs: Any) -> None:
        if kwargs.get("normalization", "max") != "max":
            raise UserError(
                "more: its localisation maps are min-max scaled; --cam-norm sigmoid does not apply"
            )
        super().__init__(model, **kwargs)
        self.modules, self.aux_layer = modules, aux_layer

    def raw_maps(self, batch: Tensor) -> Tensor:
        class_tokens, features, _ = token_pass(self.model, self.modules["tokens"], batch, self.aux_layer)
        tokens = self.modules["gcr"](class_tokens, features.flatten(2).transpose(1, 2))
        return localisation_maps(features, tokens)

    def normalize(self, total: Tensor) -> Tensor:
        return min_max_per_class(total)


@register_method
class More(Method):
    name = "more"
    description = (
        "MoRe (Yang et al., AAAI 2025), ViT backbones only (--backbone vit_base_patch16_224 --pooling gmp): "
        "one token per class beside the patch tokens, regularised by a graph module (GCR) and by CAM-derived "
        "labels (certain patches pulled to their class token, uncertain ones to the present classes'), on "
        "ToCo's network; pseudo-labels from the class tokens' localisation maps (LAM)."
    )

    backbone_modules = ("tokens",)  # the official encoder group: the backbone's learning rate

    def __init__(
        self,
        aux_layer: int = AUX_LAYER,
        warmup: float = WARMUP,
        switch: float = SWITCH,
        aux_weight: float = WEIGHTS["cls_aux"],
        distinct_weight: float = WEIGHTS["distinct"],
        ptc_weight: float = WEIGHTS["ptc"],
        cle_weight: float = WEIGHTS["cle"],
        une_weight: float = WEIGHTS["une"],
        seg_weight: float = WEIGHTS["seg"],
        gcr_ratio: float = GCR_RATIO,
        temperature: float = CONTRAST_TEMPERATURE,
        cam_scales: list[float] | tuple[float, ...] = CAM_SCALES,
        seg_channels: int = LARGEFOV_CHANNELS,
    ) -> None:
        if not 0 <= warmup <= 1 or not 0 <= switch <= 1 or not 0 < gcr_ratio <= 1 or temperature <= 0:
            raise ValueError("need 0 <= warmup <= 1, 0 <= switch <= 1, 0 < gcr_ratio <= 1, temperature > 0")
        super().__init__(
            aux_layer=aux_layer,
            warmup=warmup,
            switch=switch,
            aux_weight=aux_weight,
            distinct_weight=distinct_weight,
            ptc_weight=ptc_weight,
            cle_weight=cle_weight,
            une_weight=une_weight,
            seg_weight=seg_weight,
            gcr_ratio=gcr_ratio,
            temperature=temperature,
            cam_scales=list(cam_scales),
            seg_channels=seg_channels,
        )
        self.aux_layer, self.warmup, self.switch = int(aux_layer), float(warmup), float(switch)
        self.weights = {
            "cls_aux": float(aux_weight),
            "distinct": float(distinct_weight),
            "ptc": float(ptc_weight),
            "cle": float(cle_weight),
            "une": float(une_weight),
            "seg": float(seg_weight),
        }
        self.gcr_ratio, self.temperature = float(gcr_ratio), float(temperature)
        self.cam_scales = tuple(float(s) for s in cam_scales)
        self.seg_channels = int(seg_channels)
        self.refiner = PixelAdaptiveRefiner(downscale=2)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        if not isinstance(model, VitCamClassifier):
            raise ValueError(
                "more needs a ViT backbone, e.g. --backbone vit_base_patch16_224 (timm ViT or DeiT)"
            )
        if getattr(model.backbone, "cls_token", None) is not None:
            model.backbone.cls_token.requires_grad_(False)  # unused: DDP must not wait for its gradient
        dim, k = model.backbone.num_features, model.num_classes
        return nn.ModuleDict(
            {
                "tokens": ClassTokens(model.backbone, k),
                "gcr": GraphCategoryRepresentation(dim, self.gcr_ratio),
                "aux_head": nn.Conv2d(dim, k, kernel_size=1, bias=False),
                "seg": LargeFov(dim, k + 1, self.seg_channels),
            }
        )

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        class_tokens, features, aux = token_pass(model, modules["tokens"], batch["image"], self.aux_layer)
        cams = model.head(features)
        tokens = modules["gcr"](class_tokens, features.flatten(2).transpose(1, 2))
        return {
            "logits": model.pool(cams),
            "cams": cams,
            "features": features,
            "aux_features": aux,
            "class_tokens": tokens,
        }

    def both_cams(self, model: nn.Module, modules: nn.ModuleDict, x: Tensor) -> Tensor:
        """Raw final and auxiliary CAMs of a batch (``cam_only``), concatenated along the class axis."""
        _, features, aux = token_pass(model, modules["tokens"], x, self.aux_layer)
        return torch.cat([model.head(features), modules["aux_head"](aux)], dim=1)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        k = labels.shape[1]
        features, tokens = outputs["features"], outputs["class_tokens"]
        w = self.weights
        losses = {
            "cls_aux": w["cls_aux"]
            * F.binary_cross_entropy_with_logits(
                model.pool(modules["aux_head"](outputs["aux_features"])), labels
            ),
            "distinct": w["distinct"] * distinct_tokens_loss(tokens),
        }
        both = multi_scale_cams(lambda x: self.both_cams(model, modules, x), image, self.cam_scales)
        cams, cams_aux = both[:, :k], both[:, k:]
        grid = features.shape[-2:]
        aux_grid = F.interpolate(cams_aux, size=grid, mode="bilinear", align_corners=False)

        def token_labels(source: Tensor, thresholds: tuple[float, float]) -> Tensor:
            high, low = thresholds
            return cam_labels(source, labels, low, high, low)  # ignore_mid: only high and low act

        ptc_labels = token_labels(aux_grid, THRESHOLDS["ptc"])
        losses["ptc"] = w["ptc"] * patch_token_contrast(features, affinity_mask(ptc_labels))
        if float(batch["progress"]) <= self.switch:
            cle_labels = token_labels(aux_grid, THRESHOLDS["cle_early"])
            une_labels = ptc_labels  # the auxiliary CAMs at 0.7 / 0.25
        else:
            final_grid = F.interpolate(cams, size=grid, mode="bilinear", align_corners=False)
            cle_labels = une_labels = token_labels(final_grid, THRESHOLDS["late"])
        losses["cle"] = w["cle"] * certain_patches_loss(
            tokens, features, cle_labels, labels, self.temperature
        )
        losses["une"] = w["une"] * uncertain_patches_loss(tokens, features, une_labels, labels)

        if float(batch["progress"]) >= self.warmup:
            high, low = THRESHOLDS["ptc"]
            target = refined_labels(image, cams * labels[:, :, None, None], labels, self.refiner, high, low)
            seg = F.interpolate(
                modules["seg"](features), size=image.shape[-2:], mode="bilinear", align_corners=False
            )
            losses["seg"] = w["seg"] * segmentation_loss(seg, target)
        return losses

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return LamExtractor(model, modules, self.aux_layer, **kwargs)
