"""CLIMS: cross language image matching (Xie et al., CVPR 2022), a training-time method with frozen CLIP.

Why: a classifier's CAMs cover only the most discriminative part of an object and leak into
backgrounds that co-occur with it (boats and water, trains and rails). CLIMS turns the sigmoid of
each present class's activation map into a soft mask W and asks a frozen CLIP that the masked
image ``x·W`` matches the text "a photo of {class}." (object region-text matching), that the rest
``x·(1−W)`` does not (background region-text matching), that ``x·W`` does not match words for
co-occurring backgrounds (co-occurring background suppression), and keeps the maps small (area
regularisation).

Follows CVI-SZU/CLIMS (current code, not ``previous_version/``):

* ``net/resnet50_clims.py: CLIMS.forward``: the maps are ``sigmoid(classifier(features))``, the
  bias-free 1x1 classifier over the last stage's features, for every class (``model(...)["cams"]``);
* ``step/train_clims.py: run``: the maps and the image are resized to CLIP's input size (bilinear,
  ``align_corners=True``); for each (image, present class) pair, in row-major order, the
  foreground input is ``map·image`` and the background input ``(1−map)·image``;
* ``clip_utils.py: clip_forward``: cosine similarity of the L2-normalised CLIP image embedding and
  the embedding of ``"a photo of {class}."`` (``prompt_dict``), one text per pair;
* ``clip_loss.py``: ``L_OTM = SimMaxLoss = −mean(log(clamp(s_fg, 1e-4, 0.9999)))``,
  ``L_BTM = SimMinLoss = −mean(log(1 − clamp(s_bg, 1e-4, 0.9999)))``,
  ``L_CBS = BackgroundSuppressionLoss = −Σ log(1 − s)·[s > 0.26]`` over every foreground input and
  every background text ``"a photo of {word}."`` (no clamp, a sum, not a mean; threshold 0.26 for
  VOC, ``--cbs_loss_thresh 0.285`` for COCO), with the VOC words of ``clip_utils.background_dict``;
* ``L_REG = mean(maps)`` over all classes and pixels (feature resolution);
* total ``10·L_OTM + 24·L_BTM + 1·L_CBS + 0.2·L_REG`` (``--hyper 10,24,1,0.2``, VOC);
* pseudo-labels (``step/make_clims.py``): the classifier's ReLU CAMs (no sigmoid), multi-scale and
  flipped, each class's map over its maximum, background by threshold (``--cam_eval_thres 0.15``):
  what the engine's :class:`~wsss_domains.cam.extract.CamExtractor` does, so no extractor override.

The returned losses are already weighted (``otm`` is ``10·L_OTM``, ...). The background words come
from the domain's :meth:`~wsss_domains.domains.contract.DomainPlugin.clip_prompts` (its
``background``) where it gives some, else the official VOC list; a class's text uses the first
name the domain's prompts give it (the official code has one name per class and one template).
The built-in ``voc`` domain gives CLIP-ES's 25 background words, so a VOC run uses those, not the
official 10. The classifier's classes are the domain's one label space with as many foreground
classes; where several differ (or the classes are read from the data folder) the ``classes``
option names them in order, and the first training step fails until it does.

Deviations (also :attr:`Clims.deviations`): the official code trains in two runs, a plain CAM
(5 epochs) whose weights initialise a CLIMS run without classification loss (15 epochs, SGD, poly
schedule, backbone lr 2.5e-4, head x10); here one run keeps the engine's classification loss
throughout (weight 1) with the engine's optimiser, and the CLIMS terms join after
``start_progress`` of the budget (default 0.25, the official 5 of 20 epochs). The classifier is the
run's timm CNN (EfficientNet-Lite by default), not ResNet-50 (stride 16 as well). The images given
to CLIP are normalised with CLIP's own statistics (official: the data loader's ImageNet statistics,
close to CLIP's) and masked after normalisation, as officially (masked pixels are the mean colour).
CLIP runs in the engine's precision (official: OpenAI ``clip.load``, fp16 on GPU) and is an
open_clip model named by ``--clip-model`` / ``--clip-weights`` (official default ``ViT-B/32``);
text embeddings are computed once, not every step (CLIP is frozen, so they are the same). A batch
without any present class contributes zero CLIMS loss (the official loop would fail). CBS reuses
the foreground inputs' image embeddings (the official code encodes them a second time). Pseudo-
labels: the engine's scales, background threshold and no IRN refinement (official: IRN on top).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods.base import Method
from wsss_domains.methods.clip_methods import DEFAULT_CLIP_MODEL
from wsss_domains.methods.registry import register_method

# clip_utils.py: background_dict['voc'] (current official code), each as "a photo of {word}.".
VOC_BACKGROUND = ("tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks")
TEMPLATE = "a photo of {}."  # clip_utils.py: prompt_dict[0]
HYPER = (10.0, 24.0, 1.0, 0.2)  # --hyper for VOC: OTM, BTM, CBS, REG
CBS_THRESHOLD = 0.26  # clip_loss.py: BackgroundSuppressionLoss(threshold=0.26)
CLAMP = (1e-4, 0.9999)  # clip_loss.py: SimMaxLoss / SimMinLoss


def sim_max_loss(similarity: Tensor) -> Tensor:
    """``SimMaxLoss``: ``−mean(log(clamp(s)))`` (object region-text matching)."""
    return -torch.log(similarity.clamp(*CLAMP)).mean()


def sim_min_loss(similarity: Tensor) -> Tensor:
    """``SimMinLoss``: ``−mean(log(1 − clamp(s)))`` (background region-text matching)."""
    return -torch.log(1 - similarity.clamp(*CLAMP)).mean()


def background_suppression_loss(image_features: Tensor, background_text: Tensor, threshold: float) -> Tensor:
    """``BackgroundSuppressionLoss``: ``−Σ log(1 − s)·[s > threshold]`` over images x background words.

    Both inputs are L2-normalised embeddings (``N x C`` and ``M x C``).
    """
    similarity = image_features @ background_text.t()
    mask = (similarity > threshold).to(similarity.dtype)
    return -(torch.log(1 - similarity) * mask).sum()


def pair_inputs(maps: Tensor, clip_images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Foreground ``W·x`` and background ``(1−W)·x`` CLIP inputs of every (image, present class) pair.

    ``maps`` are the sigmoid activation maps ``B x K x h x w``, ``clip_images`` the batch already at
    CLIP's input size and normalisation; returns both inputs and the pairs ``P x 2`` (image, class),
    row-major as ``train_clims.py`` orders them.
    """
    size = clip_images.shape[-2:]
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
    pairs = torch.nonzero(labels > 0.5)
    weights = maps[pairs[:, 0], pairs[:, 1]].unsqueeze(1)
    images = clip_images[pairs[:, 0]]
    return weights * images, (1 - weights) * images, pairs


def encode_images(clip: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised CLIP image embeddings (gradients flow to the images, not to CLIP)."""
    features = clip.encode_image(images).float()
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def encode_texts(clip: nn.Module, tokenizer: Callable[..., Tensor], texts: Sequence[str]) -> Tensor:
    """L2-normalised CLIP text embeddings, one row per text."""
    device = next(clip.parameters()).device
    features = clip.encode_text(tokenizer(list(texts)).to(device)).float()
    return features / features.norm(dim=-1, keepdim=True)


def classifier_label_space(
    method: str, domain: DomainPlugin | None, classes: Sequence[str] | None, num_classes: int
) -> LabelSpace:
    """The classes of a classifier's ``num_classes`` outputs, for a training-time method that names them
    to CLIP: ``classes`` where given, else the domain's one label space of that size."""
    if domain is None:
        raise RuntimeError(f"{method}: call setup(domain, mean, std) before training")
    if classes is not None:
        if len(classes) != num_classes:
            raise ValueError(
                f"{method}: option classes names {len(classes)} classes, the classifier has {num_classes}"
            )
        return LabelSpace(tuple(classes), ((0, 0, 0),) * num_classes)
    spaces = {
        spec.label_space.foreground_names: spec.label_space
        for spec in domain.datasets().values()
        if spec.label_space_from is None and len(spec.label_space.foreground) == num_classes
    }
    if len(spaces) != 1:
        raise ValueError(
            f"{method}: cannot tell which classes of domain '{domain.name}' the classifier's {num_classes} "
            "outputs are; pass them in order: --method-option 'classes=[\"name\", ...]'"
        )
    return next(iter(spaces.values()))


@register_method
class Clims(Method):
    name = "clims"
    description = (
        "CLIMS (Xie et al., CVPR 2022): frozen CLIP matches sigmoid-CAM-masked images to class texts "
        "(object and background region-text matching), suppresses co-occurring background words, "
        "area regularisation; needs --clip-model and --clip-weights."
    )
    deviations = (
        "One run: the engine's classification loss is kept throughout (official: a separate CAM run "
        "initialises a CLIMS run without it) with the engine's optimiser; the CLIMS terms join after "
        "start_progress of the budget (0.25: the official 5 CAM of 20 epochs). A timm CNN (EfficientNet-Lite "
        "by default) instead of ResNet-50. CLIP inputs normalised with CLIP's statistics (official: ImageNet's), "
        "an open_clip model (official: OpenAI ViT-B/32, fp16), text embeddings computed once; CBS reuses the "
        "foreground embeddings; a batch without present classes adds zero loss. Background words: the domain's "
        "CLIP prompts where it gives some, else the official VOC list. Pseudo-labels: the engine's CAM "
        "extractor and background threshold, no IRN."
    )

    # The template of the background words; None: ``template`` (POLE keeps CLIMS's for them).
    background_template: ClassVar[str | None] = None

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_weights: str | None = None,
        otm_weight: float = HYPER[0],
        btm_weight: float = HYPER[1],
        cbs_weight: float = HYPER[2],
        reg_weight: float = HYPER[3],
        cbs_threshold: float = CBS_THRESHOLD,
        template: str = TEMPLATE,
        start_progress: float = 0.25,
        classes: Sequence[str] | None = None,
    ) -> None:
        if "{}" not in template:
            raise ValueError(f"clims: template must hold '{{}}' for the class name, got {template!r}")
        if not 0 <= start_progress < 1:
            raise ValueError(f"clims: start_progress must lie in [0, 1), got {start_progress}")
        super().__init__(
            clip_model=clip_model,
            clip_weights=clip_weights,
            otm_weight=otm_weight,
            btm_weight=btm_weight,
            cbs_weight=cbs_weight,
            reg_weight=reg_weight,
            cbs_threshold=cbs_threshold,
            template=template,
            start_progress=start_progress,
            classes=None if classes is None else list(classes),
        )
        self.clip_model = clip_model
        self.clip_weights = clip_weights
        self.weights = (float(otm_weight), float(btm_weight), float(cbs_weight), float(reg_weight))
        self.cbs_threshold = float(cbs_threshold)
        self.template = template
        self.start_progress = float(start_progress)
        self.classes = None if classes is None else tuple(classes)
        self._loaded: Any = None
        self._words: dict[int, tuple[list[str], list[str]]] = {}
        self._texts: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        from wsss_domains.clip.loading import resolve_clip_weights

        super().setup(domain, mean, std)
        resolve_clip_weights(self.clip_model, self.clip_weights)  # fail fast, no network
        self._words.clear()
        self._texts.clear()

    # -- CLIP and its texts ------------------------------------------------------------------
    def _clip(self, device: torch.device) -> Any:
        if self._loaded is None:
            from wsss_domains.clip.loading import load_clip

            self._loaded = load_clip(self.clip_model, self.clip_weights, device=device)
        model = self._loaded.model
        if next(model.parameters()).device != device:
            model.to(device)
        return self._loaded

    def label_space(self, num_classes: int) -> LabelSpace:
        """The classifier's classes: the ``classes`` option, or the domain's one label space of that size."""
        return classifier_label_space(self.name, self.domain, self.classes, num_classes)

    def texts(self, num_classes: int) -> tuple[list[str], list[str]]:
        """The class texts (one per classifier output) and the background texts."""
        if num_classes not in self._words:
            space = self.label_space(num_classes)
            assert self.domain is not None
            prompts = self.domain.clip_prompts(space)
            names = [(prompts.class_names.get(c) or (c,))[0] for c in space.foreground_names]
            words = tuple(prompts.background) or VOC_BACKGROUND
            background_template = self.background_template or self.template
            self._words[num_classes] = (
                [self.template.format(n) for n in names],
                [background_template.format(w) for w in words],
            )
        classes, background = self._words[num_classes]
        return list(classes), list(background)

    def text_features(self, loaded: Any, num_classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (num_classes, str(device))
        if key not in self._texts:
            classes, background = self.texts(num_classes)
            self._texts[key] = (
                encode_texts(loaded.model, loaded.tokenizer, classes),
                encode_texts(loaded.model, loaded.tokenizer, background),
            )
        return self._texts[key]

    def clip_images(self, image: Tensor, size: tuple[int, int], clip_mean_std: Any) -> Tensor:
        """The normalised batch re-normalised for CLIP and resized to its input (bilinear, aligned corners)."""
        if self.mean is None or self.std is None:
            raise RuntimeError("clims: call setup(domain, mean, std) before training")
        mean = image.new_tensor(self.mean)[:, None, None]
        std = image.new_tensor(self.std)[:, None, None]
        clip_mean, clip_std = (image.new_tensor(v)[:, None, None] for v in clip_mean_std)
        pixels = F.interpolate(image * std + mean, size=size, mode="bilinear", align_corners=True)
        return (pixels - clip_mean) / clip_std

    # -- training ----------------------------------------------------------------------------
    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        from wsss_domains.clip.loading import clip_mean_std

        cams = outputs["cams"]
        maps = torch.sigmoid(cams)
        labels = batch["label"]
        zero = cams.sum() * 0.0
        names = ("otm", "btm", "cbs", "reg")
        self.texts(cams.shape[1])  # an unknown class list fails at the first step, not when CLIMS starts
        progress = batch.get("progress")
        if (progress is not None and float(progress) < self.start_progress) or not bool((labels > 0.5).any()):
            return dict.fromkeys(names, zero)
        loaded = self._clip(cams.device)
        clip = loaded.model
        size = tuple(int(s) for s in _pair(clip.visual.image_size))
        _, background_text = self.text_features(loaded, cams.shape[1], cams.device)
        images = self.clip_images(batch["image"], size, clip_mean_std(clip))
        fg_inputs, bg_inputs, pairs = pair_inputs(maps, images, labels)
        fg = encode_images(clip, fg_inputs)
        bg = encode_images(clip, bg_inputs)
        text = self.pair_text_features(loaded, cams, images, pairs)
        otm = sim_max_loss((fg * text).sum(dim=-1))
        btm = sim_min_loss((bg * text).sum(dim=-1))
        cbs = background_suppression_loss(fg, background_text, self.cbs_threshold)
        reg = maps.mean()
        w_otm, w_btm, w_cbs, w_reg = self.weights
        return {"otm": w_otm * otm, "btm": w_btm * btm, "cbs": w_cbs * cbs, "reg": w_reg * reg}

    def pair_text_features(self, loaded: Any, cams: Tensor, clip_images: Tensor, pairs: Tensor) -> Tensor:
        """The text embedding each (image, present class) pair is matched with: its class's text.

        ``cams`` are the classifier's raw maps, ``clip_images`` the batch at CLIP's size and
        normalisation, ``pairs`` the ``P x 2`` (image, class) rows. Subclasses that pick a text per
        pair (POLE) override this.
        """
        class_text, _ = self.text_features(loaded, cams.shape[1], cams.device)
        return class_text[pairs[:, 1]]


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)[:2]  # type: ignore[return-value]
