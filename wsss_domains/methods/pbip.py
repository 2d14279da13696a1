"""PBIP: prototype-based image prompting (Tang et al., CVPR 2025) for histopathology, with a user's CLIP.

Why: a tissue class looks different from slide to slide (solid and glandular tumour, dense and loose
stroma), and one linear classifier weight per class covers only its most common look. PBIP
describes each class by several image prototypes — k-means centres of a medical CLIP's embeddings
of example images of the class — and classifies every pixel of four backbone stages by its cosine
similarity to those prototypes (mapped into each stage's feature space by a small learned adapter),
so a CAM can light up any of the class's looks. A contrastive term then asks CLIP that the image
masked by a sub-class's CAM resembles that sub-class's prototype and not the others, and that the
rest of the image does the opposite.

Follows QingchenTang/PBIP:

* ``features/excract_medclip_proces.py`` and ``features/k_mean_cos_per_class.py``: example images,
  normalised and min-max scaled to [0, 1] over the whole image, are embedded by MedCLIP's vision
  model; per class, cosine k-means (centres drawn by ``np.random.choice`` with seed 42, at most 100
  iterations, centres re-normalised, stop when they no longer move) gives ``k`` unit-length
  prototypes (``k_list 3 3 3 3``);
* ``model/model.py: ClsNetwork``: per stage ``l``, ``AdaptiveLayer`` (Linear(D, D/2), ReLU,
  Linear(D/2, C_l), truncated-normal std 0.02, zero bias) maps the prototypes to the stage's width;
  the stage map is ``s_l · normalize(x_l) @ adapter_l(P)ᵀ`` (pixel features L2-normalised, adapted
  prototypes not), ``s_l`` a learned scale starting at 1/0.07; image logits by average pooling;
* ``utils/hierarchical_utils.py``: sub-class logits merge to their class by their mean
  (``merge_train: mean``), sub-class maps at inference by a softmax-weighted sum
  (``merge_test: max``: ``Σ softmax_k(m)·m``);
* ``train_stage_1.py``: ``Σ_l w_l·BCE(merged logits_l)`` with ``l1..l4 = 0, 0.1, 1, 1``, plus
  ``l5·(L_fg + L_bg + 0.0005·mean(map_4))`` with ``l5 = 0.1``; the contrastive pairs are the
  sub-classes of present classes whose logit exceeds their class's merged logit;
* ``utils/fgbg_feature.py``: the pair's raw stage-4 map and the image, both at CLIP's input size
  (bilinear, aligned corners), give ``map·x`` and ``(1−map)·x``, each min-max scaled per channel,
  times the binary mask ``map ≥ 0.5·max`` (the maximum over all the image's sub-class maps) or its
  complement, then embedded by CLIP;
* ``utils/contrast_loss.py`` (temperature 0.07, image embeddings L2-normalised, sums over the
  batch's pairs inside the log): ``L_fg = −log(Σ e^{f·p⁺/τ} / Σ (e^{f·p⁺/τ} + Σ_j e^{f·p⁻_j/τ}))`` and
  ``L_bg = −log(Σ mean_j e^{b·p⁻_j/τ} / Σ (mean_j e^{b·p⁻_j/τ} + e^{b·p⁺/τ}))``, where ``p⁺`` is the
  pair's prototype and ``p⁻`` every other prototype (other sub-classes of the same class included);
* ``utils/validate.py: generate_cam``: per stage the softmax-merged maps, ReLU, min-max scaled per
  class, upsampled; ``0.3·map_2 + 0.3·map_3 + 0.4·map_4``.

Deviations (also :attr:`Pbip.deviations`): by default the example images are the run's training
images that carry exactly one class (official: a separate folder of example crops per class, which
``examples=DIR`` reads in the official layout ``DIR/<class name>/*.png``) or, for a class with fewer
than ``k`` of those, every training image that holds it (with a warning), embedded once without the
official random flips and rotations (and read as RGB: the official script's OpenCV read gives BGR). PBIP uses only CLIP's image side, so the
encoder is any open_clip image tower the user names (``--clip-model``, ``--clip-weights``; official:
MedCLIP, whose 512-d embedding sets the adapters' input) or, with ``encoder=NAME``, a timm CNN with
the toolkit's packaged ImageNet weights (its pooled features: ImageNet prototypes, not a medical
CLIP's — what this machine, which has no CLIP weights, can measure). Every image it embeds gets the
encoder's mean/std normalisation after the official [0, 1] scaling (MedCLIP's vision model took the
scaled tensor as is) and is resized to the encoder's input size (a timm CNN's: the official 224
px). The backbone is the run's timm CNN: its stride-4, -8 and -16 stages and its
final features stand for MiT-B1's four stages (strides 4, 8, 16, 16); a pixel whose features are
all zero (a CNN's activation allows it, MiT's features never are) has similarity 0. The engine's optimiser and
schedule (official: AdamW 5e-5, poly, 8 epochs, mixed precision), no best-checkpoint selection on a
validation split. Pseudo-labels: the engine's scales, flips and background rule on the fused map,
whose stage maps are scaled at their own resolution and fused on the stride-8 grid (official: at the
input size); the fused map is then scaled by its maximum per class like every CAM here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.errors import UserError
from wsss_domains.methods.base import Method
from wsss_domains.methods.clip_methods import DEFAULT_CLIP_MODEL
from wsss_domains.methods.registry import register_method
from wsss_domains.models.stages import capture_stages, stage_at_stride, stage_channels

STAGE_WEIGHTS = (0.0, 0.1, 1.0, 1.0)  # config.yaml: train.l1 .. l4
CONTRAST_WEIGHT = 0.1  # train.l5
AREA_WEIGHT = 0.0005  # train_stage_1.py: 0.0005 * torch.mean(cam4)
FUSE_WEIGHTS = (0.3, 0.3, 0.4)  # validate.py: fuse234
STAGE_STRIDES = (4, 8, 16)  # MiT-B1 with stride [4, 2, 2, 1]; the fourth stage is the final features
TEMPERATURE = 0.07
SCALE_INIT = 1 / 0.07
PROTOTYPE_BATCH = 32
EMBED_CHUNK = 8  # contrasted images per checkpointed encoder pass
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ENCODER_SIZE = 224  # fgbg_feature.py: FeatureExtractor(clip_size=224)


# -- prototypes ---------------------------------------------------------------------------------
def cosine_kmeans(features: np.ndarray, k: int, seed: int = 42, max_iter: int = 100) -> np.ndarray:
    """``k_mean_cos_per_class.py: CosineSimilarityKMeans``: unit-length centres ``k x D`` of unit rows."""
    rng = np.random.RandomState(seed)  # the official np.random.seed(42) then np.random.choice
    centres = features[rng.choice(features.shape[0], k, replace=False)].copy()
    for _ in range(max_iter):
        similarity = (
            features
            @ centres.T
            / (np.linalg.norm(features, axis=1, keepdims=True) * np.linalg.norm(centres, axis=1)[None])
        )
        assigned = similarity.argmax(axis=1)
        previous = centres.copy()
        for i in range(k):
            members = features[assigned == i]
            if len(members):
                centres[i] = members.mean(axis=0)
                centres[i] /= np.linalg.norm(centres[i])
        if np.allclose(previous, centres):
            break
    return centres


def minmax_whole(images: Tensor) -> Tensor:
    """Each image scaled to [0, 1] by its own minimum and maximum over all channels and pixels."""
    low = images.flatten(1).amin(dim=1)[:, None, None, None]
    high = images.flatten(1).amax(dim=1)[:, None, None, None]
    return (images - low) / (high - low + 1e-8)


def minmax_per_channel(images: Tensor, eps: float = 1e-8) -> Tensor:
    """Each channel scaled to [0, 1] by its own minimum and maximum (``fgbg_feature.py``: eps 1e-8;
    ``validate.py: get_seg_label``: 1e-6)."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    return (images - low) / (high - low + eps)


def example_images(labels: Tensor, per_class: int) -> list[list[int]]:
    """Per class, the indices of the images its prototypes are clustered from.

    The images that hold only that class (the official example crops are single-class); where a class
    has fewer than ``per_class`` of them (histology patches rarely show tumour alone), every image
    that holds it, with a warning. ``labels``: ``N x K`` booleans.
    """
    import warnings

    single = labels.sum(dim=1) == 1
    chosen = []
    for k in range(labels.shape[1]):
        rows = torch.nonzero(labels[:, k] & single).flatten().tolist()
        if len(rows) < per_class:
            present = torch.nonzero(labels[:, k]).flatten().tolist()
            if len(present) < per_class:
                raise UserError(
                    f"pbip: class {k} is present in {len(present)} training images, fewer than "
                    f"prototypes_per_class={per_class}; lower it with --method-option prototypes_per_class=N"
                )
            warnings.warn(
                f"pbip: class {k} has {len(rows)} single-class training images (fewer than "
                f"prototypes_per_class={per_class}); its prototypes are clustered from the {len(present)} "
                "images that contain it, other classes included",
                stacklevel=2,
            )
            rows = present
        chosen.append(rows)
    return chosen


# -- the prototype classifier -------------------------------------------------------------------
def example_files(root: Path, class_names: Sequence[str], per_class: int) -> list[list[Path]]:
    """Per class, the image files of ``root/<class name>/`` (sorted); a clear error for a missing or
    too small folder."""
    from wsss_domains.segmentation.writer import IMAGE_SUFFIXES

    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = []
    for name in class_names:
        folder = root / name
        if not folder.is_dir():
            raise UserError(
                f"pbip: examples folder {root} has no subfolder '{name}' (one per class: "
                f"{', '.join(class_names)}; found: {', '.join(found) or 'none'})"
            )
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(paths) < per_class:
            raise UserError(
                f"pbip: {folder} holds {len(paths)} images, fewer than prototypes_per_class={per_class}"
            )
        files.append(paths)
    return files


class AdaptiveLayer(nn.Sequential):
    """``model.py: AdaptiveLayer``: a two-layer MLP from CLIP's embedding to a stage's width."""

    def __init__(self, in_dim: int, ratio: float, out_dim: int) -> None:
        hidden = int(in_dim * ratio)
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        for layer in (self[0], self[2]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)


class PrototypeHead(nn.Module):
    """The prototypes (a buffer, saved with the run) and each stage's adapter and logit scale."""

    def __init__(self, prototypes: Tensor, widths: Sequence[int], per_class: int, ratio: float) -> None:
        super().__init__()
        self.per_class = per_class
        self.register_buffer("prototypes", prototypes.float().clone())
        dim = prototypes.shape[1]
        self.adapters = nn.ModuleList(AdaptiveLayer(dim, ratio, width) for width in widths)
        self.scales = nn.Parameter(torch.full((len(widths),), SCALE_INIT))

    def stage_maps(self, stages: Sequence[Tensor]) -> list[Tensor]:
        """``B x (K·k) x h x w`` sub-class logit maps of each stage."""
        maps = []
        for i, (features, adapter) in enumerate(zip(stages, self.adapters, strict=True)):
            adapted = adapter(self.prototypes).to(features.dtype)
            unit = F.normalize(features, dim=1)  # a ReLU6 CNN's pixel can be all zero: similarity 0
            maps.append(self.scales[i] * torch.einsum("bchw,nc->bnhw", unit, adapted))
        return maps


def merge_mean(logits: Tensor, per_class: int) -> Tensor:
    """``merge_to_parent_predictions(method='mean')``: each class's sub-class logits averaged."""
    return logits.unflatten(1, (-1, per_class)).mean(dim=2)


def merge_softmax(maps: Tensor, per_class: int) -> Tensor:
    """``merge_subclass_cams_to_parent(method='max')``: ``Σ_k softmax_k(m)·m`` per pixel."""
    grouped = maps.unflatten(1, (-1, per_class))
    return (grouped.softmax(dim=2) * grouped).sum(dim=2)


def expand_labels(labels: Tensor, per_class: int) -> Tensor:
    """``expand_parent_to_subclass_labels``: each class's label repeated for its sub-classes."""
    return labels.repeat_interleave(per_class, dim=1)


# -- the contrastive term ----------------------------------------------------------------------
def contrast_pairs(sub_logits: Tensor, labels: Tensor, per_class: int) -> Tensor:
    """``cls4_bir``: ``P x 2`` (image, sub-class) rows, row-major, of present classes' sub-classes
    whose logit exceeds their class's merged (mean) logit."""
    parent = expand_labels(merge_mean(sub_logits, per_class), per_class)
    chosen = (sub_logits > parent) & (expand_labels(labels, per_class) > 0.5)
    return torch.nonzero(chosen)


def masked_images(
    maps: Tensor, image: Tensor, pairs: Tensor, size: tuple[int, int], alpha: float
) -> tuple[Tensor, Tensor]:
    """``FeatureExtractor.process_batch``: the pairs' foreground and background images, in [0, 1].

    ``maps`` are the raw stage-4 sub-class maps, ``image`` the normalised batch; both go to ``size``
    (bilinear, aligned corners). The binary mask keeps pixels where the pair's map reaches ``alpha``
    times the largest value of any of its image's maps.
    """
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
    threshold = maps.flatten(1).amax(dim=1) * alpha
    mask = (maps >= threshold[:, None, None, None]).to(maps.dtype)
    weight = maps[pairs[:, 0], pairs[:, 1]].unsqueeze(1)
    binary = mask[pairs[:, 0], pairs[:, 1]].unsqueeze(1)
    pixels = image[pairs[:, 0]]
    foreground = minmax_per_channel(weight * pixels) * binary
    background = minmax_per_channel((1 - weight) * pixels) * (1 - binary)
    return foreground, background


def info_nce_foreground(features: Tensor, positive: Tensor, negative: Tensor, temperature: float) -> Tensor:
    """``InfoNCELossFG``: ``features`` ``P x D`` (unnormalised), ``positive`` ``P x D``, ``negative`` ``P x M x D``."""
    unit = features / features.norm(dim=-1, keepdim=True)
    pos = (unit * positive).sum(dim=-1) / temperature
    neg = torch.einsum("pd,pmd->pm", unit, negative) / temperature
    every = torch.cat([pos, neg.flatten()])
    return -(torch.logsumexp(pos, dim=0) - torch.logsumexp(every, dim=0))


def info_nce_background(features: Tensor, positive: Tensor, negative: Tensor, temperature: float) -> Tensor:
    """``InfoNCELossBG``: the background image should match the other prototypes (their mean
    exponential similarity), not the pair's own."""
    unit = features / features.norm(dim=-1, keepdim=True)
    others = torch.einsum("pd,pmd->pm", unit, negative) / temperature
    own = (unit * positive).sum(dim=-1) / temperature
    mean_others = torch.logsumexp(others, dim=1) - np.log(others.shape[1])  # log mean_j e^{.}
    return -(torch.logsumexp(mean_others, dim=0) - torch.logsumexp(torch.cat([mean_others, own]), dim=0))


class PbipCamExtractor(CamExtractor):
    """``generate_cam``: stages 2-4's merged maps, rectified, min-max scaled, fused 0.3/0.3/0.4."""

    def __init__(self, model: nn.Module, head: PrototypeHead, stages: Sequence[int], **kwargs: Any) -> None:
        if kwargs.get("normalization", "max") != "max":
            raise UserError(
                "pbip: its fused CAMs are min-max scaled (generate_cam); --cam-norm sigmoid does not apply"
            )
        super().__init__(model, **kwargs)
        self.head = head
        self.stages = tuple(stages)

    def raw_maps(self, batch: Tensor) -> Tensor:
        maps = pbip_stage_maps(self.model, self.head, batch, self.stages)[1:]
        size = maps[0].shape[-2:]
        fused = None
        for weight, stage in zip(FUSE_WEIGHTS, maps, strict=True):
            merged = minmax_per_channel(F.relu(merge_softmax(stage, self.head.per_class)), eps=1e-6)
            if merged.shape[-2:] != size:
                merged = F.interpolate(merged, size=size, mode="bilinear", align_corners=True)
            fused = weight * merged if fused is None else fused + weight * merged
        assert fused is not None
        return fused


def pbip_stage_maps(
    model: nn.Module, head: PrototypeHead, image: Tensor, stages: Sequence[int]
) -> list[Tensor]:
    """The four stages' sub-class maps from one backbone pass (three timm stages and the final features)."""
    with capture_stages(model.backbone, list(stages)) as captured:
        final = model.features(image)
    return head.stage_maps([*captured, final])


class PromptEncoder:
    """The frozen image encoder whose embeddings are the prototypes and the contrasted images.

    PBIP uses only CLIP's image side (official: MedCLIP's vision model), so any frozen image
    encoder can stand in: a CLIP image tower the user brings, or an ImageNet timm CNN whose weights
    ship with the toolkit (its globally pooled features), for machines without CLIP weights.
    """

    def __init__(
        self, forward: Any, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.forward = forward
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def clip(cls, model_name: str, weights: str | None, device: torch.device) -> PromptEncoder:
        from wsss_domains.clip.loading import clip_mean_std, load_clip

        model = load_clip(model_name, weights, device=device).model
        return cls(model.encode_image, _pair(model.visual.image_size), *clip_mean_std(model))

    @classmethod
    def timm(cls, name: str, weights: str, device: torch.device) -> PromptEncoder:
        import timm

        from wsss_domains.models.weights import load_backbone_weights

        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg")
        load_backbone_weights(model, name, weights)
        model.eval().requires_grad_(False).to(device)
        config = model.pretrained_cfg
        size = (ENCODER_SIZE, ENCODER_SIZE)  # the official clip_size, whatever the CNN was trained at
        return cls(model, size, config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD))

    def __call__(self, images: Tensor) -> Tensor:
        """Embeddings ``N x D`` of ``[0, 1]`` images (resized, normalised; gradients reach the images)."""
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=True)
        mean, std = (images.new_tensor(v)[:, None, None] for v in (self.mean, self.std))
        return self.forward((images - mean) / std).float()

    def to(self, device: torch.device) -> PromptEncoder:
        if isinstance(self.forward, nn.Module):
            self.forward.to(device)
        elif isinstance(getattr(self.forward, "__self__", None), nn.Module):
            self.forward.__self__.to(device)
        return self


@register_method
class Pbip(Method):
    name = "pbip"
    description = (
        "PBIP (Tang et al., CVPR 2025): k-means prototypes per class of a (medical) CLIP's image embeddings of "
        "single-class training images, cosine-matched to four backbone stages through learned adapters; "
        "the encoder contrasts CAM-masked images with them. Needs --clip-model and --clip-weights, or "
        "--method-option encoder=tf_efficientnet_lite2 (ImageNet features instead of CLIP's); "
        "examples=DIR clusters the prototypes from DIR/<class>/ images (the official curated crops)."
    )
    deviations = (
        "Example images: the run's training images with exactly one class (official: a folder of example crops "
        "per class, read with examples=DIR), or every image holding the class where it has fewer than k "
        "single-class ones; read as RGB (official: OpenCV's BGR); embedded "
        "once without random flips/rotations. The encoder: any open_clip image tower (official: MedCLIP) or, with "
        "encoder=NAME, a timm CNN with packaged ImageNet weights; its mean/std applied after the official [0, 1] "
        "scaling; images resized to its input. A timm CNN's "
        "stride-4/8/16 stages and final features stand for MiT-B1's four stages (an all-zero pixel feature, "
        "which a CNN can have, matches nothing; MiT's never are). The engine's optimiser and "
        "schedule, no best-checkpoint selection. Pseudo-labels: stage maps scaled at their own resolution and "
        "fused on the stride-8 grid, then the engine's scales, flips, per-class max and background rule."
    )
    classification_weight = 0.0  # the per-stage losses below replace the engine's one

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_weights: str | None = None,
        encoder: str = "clip",
        encoder_weights: str = "imagenet",
        prototypes_per_class: int = 3,
        adapter_ratio: float = 0.5,
        stage_weights: Sequence[float] = STAGE_WEIGHTS,
        contrast_weight: float = CONTRAST_WEIGHT,
        area_weight: float = AREA_WEIGHT,
        mask_alpha: float = 0.5,
        temperature: float = TEMPERATURE,
        examples: str | None = None,
    ) -> None:
        if prototypes_per_class < 1:
            raise ValueError(f"pbip: prototypes_per_class must be >= 1, got {prototypes_per_class}")
        if len(stage_weights) != 4 or min(stage_weights) < 0:
            raise ValueError(f"pbip: stage_weights are four weights >= 0 (l1..l4), got {list(stage_weights)}")
        if not 0 < mask_alpha <= 1 or temperature <= 0 or adapter_ratio <= 0:
            raise ValueError("pbip: mask_alpha must lie in (0, 1], temperature and adapter_ratio be > 0")
        super().__init__(
            clip_model=clip_model,
            clip_weights=clip_weights,
            encoder=encoder,
            encoder_weights=encoder_weights,
            prototypes_per_class=prototypes_per_class,
            adapter_ratio=adapter_ratio,
            stage_weights=list(stage_weights),
            contrast_weight=contrast_weight,
            area_weight=area_weight,
            mask_alpha=mask_alpha,
            temperature=temperature,
            examples=examples,
        )
        self.clip_model = clip_model
        self.clip_weights = clip_weights
        self.encoder = encoder
        self.encoder_weights = encoder_weights
        self.per_class = int(prototypes_per_class)
        self.ratio = float(adapter_ratio)
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.contrast_weight = float(contrast_weight)
        self.area_weight = float(area_weight)
        self.alpha = float(mask_alpha)
        self.temperature = float(temperature)
        self.examples = None if examples is None else Path(examples).expanduser()
        self._encoder: PromptEncoder | None = None
        self.prototypes: Tensor | None = None  # set by prepare_training

    def setup(self, domain: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        super().setup(domain, mean, std)
        self.prototypes = None
        if self.examples is not None and not self.examples.is_dir():
            raise UserError(f"pbip: examples folder {self.examples} does not exist")
        if self.encoder == "clip":
            from wsss_domains.clip.loading import resolve_clip_weights

            resolve_clip_weights(self.clip_model, self.clip_weights)  # fail fast, no network
        else:
            self.prompt_encoder(torch.device("cpu"))  # an unknown name or missing weights fail here

    def prompt_encoder(self, device: torch.device) -> PromptEncoder:
        """The frozen encoder of the prototypes (CLIP's image tower or a timm CNN), on ``device``."""
        if self._encoder is None:
            if self.encoder == "clip":
                self._encoder = PromptEncoder.clip(self.clip_model, self.clip_weights, device)
            else:
                self._encoder = PromptEncoder.timm(self.encoder, self.encoder_weights, device)
        return self._encoder.to(device)

    def embed(self, images: Tensor) -> Tensor:
        """The prompt encoder's embeddings of ``[0, 1]`` images ``N x 3 x H x W``.

        With gradients on, in chunks under activation checkpointing: each contrasted pair puts two
        images through the encoder, and at a batch of 32 keeping every pass's activations for the
        backward took 18 GB on the CPU; recomputing them chunk by chunk costs one more forward.
        """
        encoder = self.prompt_encoder(images.device)
        if not torch.is_grad_enabled() or not images.requires_grad:
            return encoder(images)
        chunks = images.split(EMBED_CHUNK)
        return torch.cat([checkpoint(encoder, chunk, use_reentrant=False) for chunk in chunks])

    def embed_dim(self) -> int:
        if self.encoder == "clip":
            from wsss_domains.clip.loading import clip_embed_dim

            return clip_embed_dim(self.clip_model)
        import timm

        return int(timm.create_model(self.encoder, pretrained=False, num_classes=0).num_features)

    # -- prototypes from the training split -----------------------------------------------------
    @torch.no_grad()
    def prepare_training(
        self, dataset: Dataset, device: torch.device | None = None, class_names: Sequence[str] | None = None
    ) -> None:
        """Embed each class's example images and cluster their embeddings into its prototypes."""
        from wsss_domains.progress import progress_bar

        device = device or torch.device("cpu")
        if self.examples is not None:
            self.prototypes = self.folder_prototypes(self.examples, class_names, device)
            return
        labels = [dataset[i]["label"] > 0.5 for i in range(len(dataset))]  # type: ignore[arg-type]
        if not labels:
            raise UserError("pbip: the training split is empty")
        chosen = example_images(torch.stack(labels), self.per_class)
        used = sorted({i for rows in chosen for i in rows})
        embedded: dict[int, Tensor] = {}
        for start in progress_bar(range(0, len(used), PROTOTYPE_BATCH), desc="pbip: embedding examples"):
            batch = used[start : start + PROTOTYPE_BATCH]
            images = torch.stack([dataset[i]["image"] for i in batch]).to(device).float()
            embedded.update(zip(batch, self.embed(minmax_whole(images)).cpu(), strict=True))
        centres = []
        for rows in chosen:
            features = torch.stack([embedded[i] for i in rows]).double().numpy()
            features /= np.linalg.norm(features, axis=1, keepdims=True)
            centres.append(torch.from_numpy(cosine_kmeans(features, self.per_class)))
        self.prototypes = torch.cat(centres).float()

    def folder_prototypes(
        self, root: Path, class_names: Sequence[str] | None, device: torch.device
    ) -> Tensor:
        """Prototypes from the official layout, ``root/<class name>/<image files>``: each image normalised
        with the run's mean and std, scaled to [0, 1] as a whole, embedded; k-means per class."""
        from wsss_domains.data.io import read_rgb
        from wsss_domains.progress import progress_bar
        from wsss_domains.training.data import normalize

        if class_names is None:
            raise UserError("pbip: examples=DIR needs the run's class names (pass them to prepare_training)")
        files = example_files(root, class_names, self.per_class)
        centres = []
        for name, paths in zip(class_names, files, strict=True):
            features = []
            for path in progress_bar(paths, desc=f"pbip: embedding {name} examples", unit="img"):
                image = normalize(read_rgb(path), self.mean, self.std)[None].to(device)
                features.append(self.embed(minmax_whole(image))[0].cpu())
            array = torch.stack(features).double().numpy()
            array /= np.linalg.norm(array, axis=1, keepdims=True)
            centres.append(torch.from_numpy(cosine_kmeans(array, self.per_class)))
        return torch.cat(centres).float()

    def stages(self, model: nn.Module) -> list[int]:
        return [stage_at_stride(model.backbone, s) for s in STAGE_STRIDES]

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        count = model.num_classes * self.per_class
        if self.prototypes is None:  # a finished run being loaded: the buffer comes from its method file
            prototypes = torch.zeros(count, self.embed_dim())
        elif self.prototypes.shape[0] != count:
            raise UserError(
                f"pbip: {self.prototypes.shape[0]} prototypes for {model.num_classes} classes x {self.per_class}"
            )
        else:
            prototypes = self.prototypes
        widths = [*stage_channels(model.backbone, self.stages(model)), model.backbone.num_features]
        return nn.ModuleDict({"pbip": PrototypeHead(prototypes, widths, self.per_class, self.ratio)})

    # -- training ------------------------------------------------------------------------------
    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        maps = pbip_stage_maps(model, modules["pbip"], batch["image"], self.stages(model))
        outputs = {f"sub_logits{i + 1}": m.mean(dim=(2, 3)) for i, m in enumerate(maps)}
        outputs["sub_maps4"] = maps[3]
        outputs["logits"] = merge_mean(outputs["sub_logits4"], self.per_class)
        return outputs

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        labels = batch["label"]
        losses = {}
        for i, weight in enumerate(self.stage_weights):
            merged = merge_mean(outputs[f"sub_logits{i + 1}"], self.per_class)
            losses[f"cls{i + 1}"] = weight * F.binary_cross_entropy_with_logits(merged, labels)
        maps = outputs["sub_maps4"]
        losses["area"] = self.contrast_weight * self.area_weight * maps.mean()
        pairs = contrast_pairs(outputs["sub_logits4"], labels, self.per_class)
        if len(pairs) == 0:  # the official loop would fail; nothing to contrast
            zero = maps.sum() * 0.0
            return {**losses, "fg": zero, "bg": zero}
        size = self.prompt_encoder(maps.device).size
        foreground, background = masked_images(maps, batch["image"], pairs, size, self.alpha)
        prototypes = modules["pbip"].prototypes
        own = prototypes[pairs[:, 1]]
        others = torch.stack([_without(prototypes, int(j)) for j in pairs[:, 1]])
        fg = info_nce_foreground(self.embed(foreground), own, others, self.temperature)
        bg = info_nce_background(self.embed(background), own, others, self.temperature)
        return {**losses, "fg": self.contrast_weight * fg, "bg": self.contrast_weight * bg}

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        return PbipCamExtractor(model, modules["pbip"], self.stages(model), **kwargs)


def _without(rows: Tensor, index: int) -> Tensor:
    return torch.cat([rows[:index], rows[index + 1 :]])


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)[:2]  # type: ignore[return-value]
