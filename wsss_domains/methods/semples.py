"""SemPLeS: semantic prompt learning (Lin et al., WACV 2025), CLIMS-style matching plus learned background prompts.

Why: CLIP matching alone (CLIMS) pulls a CAM towards its class text, but the regions that co-occur
with a class (water with boats, stroma around tumour) also match that text. SemPLeS learns, per
class, a prompt that describes what lies *outside* the class's CAM and does not describe the class,
then keeps the CAM's foreground away from that prompt. Hand-written background words (CLIMS's list)
are replaced by prompts learned from the data, which is what imagery far from CLIP's training
captions (histology, aerial scenes) needs.

Follows the official code (NVIDIA, ``engine1.py``, ``engine2.py``, ``engine3.py``, ``clip_utils.py``,
``clip_loss.py``, ``CLIP-main/clip/model.py: encode_btp``):

* the maps: each present class's CAM, resized to CLIP's input (bilinear, ``align_corners=True``),
  min-max normalised per map, ``(m − min) / (max − min + ε)`` with ε = 0.1 (stages a, c) or 1e-4
  (stage b); foreground input ``m·x``, background input ``(1−m)·x`` per (image, present class) pair;
* (a) segment-label matching: ``L_OTM + λ_a·L_BTM`` with CLIMS's ``SimMaxLoss`` / ``SimMinLoss`` on
  the cosine similarity of the masked image and ``"a photo of {class}."`` (VOC: ``--hypers 2.4``);
* (b) contrastive prompt learning, CAM model frozen: a learned prompt per class, ``L`` token vectors
  (``BTP``: ``torch.rand(n_class, L, width)``, ``--btp_length 30``) encoded as
  ``[SOT] a photo of [P_1..P_L] . [EOT]`` by the frozen text tower (pooled at the EOT token);
  ``SimMax(sim(bg input, prompt_c)) + λ_b·mean(log(clamp(sim(text_c, prompt_c))))`` (VOC: 0.02), only
  the prompts learn (AdamW, lr 0.1·128/512, weight decay 0.03, cosine);
* (c) prompt-guided semantic refinement, prompts frozen: ``L_OTM + λ_a·L_BTM +
  λ_c·SimMin(sim(fg input, prompt_c))`` (VOC: ``--hypers 2.4 0.05``).

The class texts are the domain's first prompt name per class (as :mod:`~wsss_domains.methods.clims`).
Returned losses are weighted (``btm`` is ``λ_a·L_BTM``, ...).

Deviations (also :attr:`Semples.deviations`): the official code runs three trainings (a: CAM model
with matching, b: prompts with a frozen, a-trained model, c: a fresh model from the baseline
checkpoint with the frozen prompts). Here one run keeps the engine's classification loss throughout:
until ``start_progress`` (0.25) the classifier learns alone; until ``refine_progress`` (0.625) it
learns with (a) while the prompts learn (b) from its current, detached maps (so the prompt loss never
reaches the classifier); after that the prompts stop learning and (c) continues from the same
weights (official: restarts from the baseline). The prompts train in their own optimiser group at
``prompt_lr_scale`` (25) times the engine's head rate (1e-3: 0.025, the official rate) with the
engine's weight decay and cosine schedule. The CAM is the timm CNN's (official: WeakTr's
attention-refined ViT CAM); CLIP sees CLIP-normalised, masked-after-normalisation inputs (as in
:mod:`~wsss_domains.methods.clims`) from an open_clip model; text embeddings of the class texts are
computed once. Pseudo-labels: the engine's CAM extractor and background threshold (official: the
CAMs go to FMA-WSSS's pseudo-label step).

Under DDP the prompts are unused outside (b): train with ``--strategy ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.domains.contract import DomainPlugin
from wsss_domains.methods.clims import (
    CLAMP,
    TEMPLATE,
    Clims,
    _pair,
    encode_images,
    sim_max_loss,
    sim_min_loss,
)
from wsss_domains.methods.clip_methods import DEFAULT_CLIP_MODEL
from wsss_domains.methods.registry import register_method

HYPERS = (2.4, 0.02, 0.05)  # VOC: main1/main3 --hypers 2.4 (0.05), main2 --hypers 0.02
PROMPT_LENGTH = 30  # README: --btp_length 30
PROMPT_PREFIX = "a photo of"  # encode_btp: template_tokens_dict['a photo of ']
PREFIX_TOKENS = 3  # the prefix's tokens in CLIP's BPE (prompt_tokens checks it)
MATCHING_EPS, PROMPT_EPS = 0.1, 1e-4  # engine1/engine3 vs engine2 min-max denominators


def pair_maps(cams: Tensor, labels: Tensor, size: tuple[int, int], eps: float) -> tuple[Tensor, Tensor]:
    """Each present (image, class) pair's CAM at CLIP's ``size``, min-max normalised; and the pairs ``P x 2``.

    Row-major pair order, as the official loops; the denominator is ``max − min + eps``.
    """
    maps = F.interpolate(cams, size=size, mode="bilinear", align_corners=True)
    pairs = torch.nonzero(labels > 0.5)
    chosen = maps[pairs[:, 0], pairs[:, 1]]
    low = chosen.amin(dim=(-2, -1), keepdim=True)
    high = chosen.amax(dim=(-2, -1), keepdim=True)
    return ((chosen - low) / (high - low + eps)).unsqueeze(1), pairs


class BackgroundPrompts(nn.Module):
    """One learned prompt per class: ``L`` token vectors inserted into ``a photo of [P_1..P_L].``.

    Only the vectors are parameters; CLIP's text tower is passed in at encoding time, so the saved
    weights of a run hold the prompts and nothing of CLIP.
    """

    def __init__(self, num_classes: int, length: int, width: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.rand(num_classes, length, width))  # BTP: torch.rand

    def encode(self, clip: nn.Module, tokenizer: Any) -> Tensor:
        """L2-normalised text embeddings of every class's prompt (``K x C``), ``encode_btp``'s layout."""
        from wsss_domains.clip.text import TextTower

        tower = TextTower.of(clip)
        num_classes, length, _ = self.prompts.shape
        device = tower.token_embedding.weight.device
        tokens, start = prompt_tokens(tokenizer, length)
        tokens = tokens.to(device)
        embedded = tower.embed_tokens(tokens).expand(num_classes, -1, -1)
        x = torch.cat(
            [embedded[:, :start], self.prompts.to(embedded.dtype), embedded[:, start + length :]], dim=1
        )
        features = tower.encode(x, tokens.expand(num_classes, -1)).float()
        return features / features.norm(dim=-1, keepdim=True)


def prompt_tokens(tokenizer: Any, length: int) -> tuple[Tensor, int]:
    """Tokens of ``a photo of X..X.`` (``1 x context``) and the position of the first ``X``: the ``X``
    slots are where the prompt vectors go (``encode_btp``: SOT, the prefix's tokens, the prompt).

    Checks that each placeholder is one token right after the prefix and that the text fits the tower.
    """
    placeholder = " ".join(["X"] * length)
    tokens = tokenizer([f"{PROMPT_PREFIX} {placeholder}."])
    start = 1 + PREFIX_TOKENS  # SOT, the prefix
    x_token = int(tokenizer(["X"])[0, 1])
    dot = int(tokenizer(["."])[0, 1])
    if tokens.shape[1] < start + length + 2 or not bool((tokens[0, start : start + length] == x_token).all()):
        raise ValueError(
            f"semples: a prompt of {length} vectors does not fit the text tower's {tokens.shape[1]} tokens; "
            "lower prompt_length"
        )
    if int(tokens[0, start + length]) != dot or int((tokenizer([PROMPT_PREFIX])[0] != 0).sum()) != start + 1:
        raise ValueError(
            f"semples: the tokenizer does not encode the template as '{PROMPT_PREFIX}' + prompt + '.'"
        )
    return tokens, start


@register_method
class Semples(Clims):
    name = "semples"
    description = (
        "SemPLeS (Lin et al., WACV 2025): CLIMS-style matching of min-max CAM-masked images to class texts, "
        "plus a learned background prompt per class that describes what lies outside its CAM (and not the "
        "class) and that the CAM's foreground is then kept from; needs --clip-model and --clip-weights."
    )
    deviations = (
        "One run keeping the engine's classification loss: classifier alone until start_progress (0.25), then "
        "matching (a) while the prompts learn (b) from the current detached maps, then from refine_progress "
        "(0.625) frozen prompts guide the refinement (c) from the same weights (official: three trainings, c "
        "restarting from the baseline). Prompts in their own optimiser group at prompt_lr_scale x the head's "
        "rate with the engine's weight decay and schedule. A timm CNN's CAM (official: WeakTr's "
        "attention-refined ViT CAM); CLIP-normalised inputs, an open_clip model, class-text embeddings computed "
        "once. Pseudo-labels: the engine's CAM extractor and background threshold (official: FMA-WSSS)."
    )

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_weights: str | None = None,
        btm_weight: float = HYPERS[0],
        prompt_text_weight: float = HYPERS[1],
        refine_weight: float = HYPERS[2],
        prompt_length: int = PROMPT_LENGTH,
        prompt_lr_scale: float = 25.0,
        template: str = TEMPLATE,
        start_progress: float = 0.25,
        refine_progress: float = 0.625,
        classes: Sequence[str] | None = None,
    ) -> None:
        """SemPLeS's weights are the VOC defaults of the official README (COCO: 0.75, 0.01, 0.2)."""
        super().__init__(
            clip_model=clip_model,
            clip_weights=clip_weights,
            otm_weight=1.0,
            btm_weight=btm_weight,
            cbs_weight=0.0,
            reg_weight=0.0,
            template=template,
            start_progress=start_progress,
            classes=classes,
        )
        if prompt_length < 1:
            raise ValueError(f"semples: prompt_length must be at least 1, got {prompt_length}")
        if prompt_lr_scale <= 0:
            raise ValueError(f"semples: prompt_lr_scale must be positive, got {prompt_lr_scale}")
        if not self.start_progress <= refine_progress <= 1:
            raise ValueError(
                f"semples: refine_progress must lie in [start_progress, 1] = [{self.start_progress}, 1], "
                f"got {refine_progress}"
            )
        for key in ("otm_weight", "cbs_weight", "reg_weight", "cbs_threshold"):
            self.options.pop(key)  # fixed by the method, not options
        self.options.update(
            prompt_text_weight=prompt_text_weight,
            refine_weight=refine_weight,
            prompt_length=prompt_length,
            prompt_lr_scale=prompt_lr_scale,
            refine_progress=refine_progress,
        )
        self.prompt_text_weight = float(prompt_text_weight)
        self.refine_weight = float(refine_weight)
        self.prompt_length = int(prompt_length)
        self.prompt_lr_scale = float(prompt_lr_scale)
        self.refine_progress = float(refine_progress)

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        from wsss_domains.clip.loading import clip_text_shape

        super().setup(domain, mean, std)
        _, context = clip_text_shape(self.clip_model)
        needed = PREFIX_TOKENS + self.prompt_length + 3  # SOT, the prefix, the prompt, '.', EOT
        if needed > context:
            raise ValueError(
                f"semples: a prompt of {self.prompt_length} vectors needs {needed} tokens, "
                f"'{self.clip_model}' reads {context}; lower prompt_length"
            )

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        from wsss_domains.clip.loading import clip_text_shape

        width, _ = clip_text_shape(self.clip_model)
        return nn.ModuleDict({"prompts": BackgroundPrompts(model.num_classes, self.prompt_length, width)})

    def learning_rate_scales(self) -> Mapping[str, float]:
        return {"prompts": self.prompt_lr_scale}

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        from wsss_domains.clip.loading import clip_mean_std

        cams = outputs["cams"]
        labels = batch["label"]
        prompts: BackgroundPrompts = modules["prompts"]  # type: ignore[assignment]
        # The prompts stay out of the graph outside (b): no gradient, so AdamW leaves them as they are.
        zero = cams.sum() * 0.0
        names = ("otm", "btm", "prompt_image", "prompt_text", "refine")
        self.texts(cams.shape[1])  # an unknown class list fails at the first step
        progress = batch.get("progress")
        progress_value = 1.0 if progress is None else float(progress)
        if progress_value < self.start_progress or not bool((labels > 0.5).any()):
            return dict.fromkeys(names, zero)
        loaded = self._clip(cams.device)
        clip = loaded.model
        size = tuple(int(s) for s in _pair(clip.visual.image_size))
        images = self.clip_images(batch["image"], size, clip_mean_std(clip))
        class_text, _ = self.text_features(loaded, cams.shape[1], cams.device)

        maps, pairs = pair_maps(cams, labels, size, MATCHING_EPS)
        pixels = images[pairs[:, 0]]
        text = class_text[pairs[:, 1]]
        fg = encode_images(clip, maps * pixels)
        bg = encode_images(clip, (1 - maps) * pixels)
        losses = dict.fromkeys(names, zero)
        losses["otm"] = sim_max_loss((fg * text).sum(dim=-1))
        losses["btm"] = self.weights[1] * sim_min_loss((bg * text).sum(dim=-1))
        if progress_value < self.refine_progress:  # (b): the prompts learn from the frozen maps
            prompt_features = prompts.encode(clip, loaded.tokenizer)[pairs[:, 1]]
            with torch.no_grad():
                frozen, _ = pair_maps(cams.detach(), labels, size, PROMPT_EPS)
                frozen_bg = encode_images(clip, (1 - frozen) * pixels)
            losses["prompt_image"] = sim_max_loss((frozen_bg * prompt_features).sum(dim=-1))
            label_similarity = (text * prompt_features).sum(dim=-1).clamp(*CLAMP)
            losses["prompt_text"] = self.prompt_text_weight * torch.log(label_similarity).mean()
        else:  # (c): the frozen prompts keep the foreground from the background they describe
            with torch.no_grad():
                prompt_features = prompts.encode(clip, loaded.tokenizer)[pairs[:, 1]]
            losses["refine"] = self.refine_weight * sim_min_loss((fg * prompt_features).sum(dim=-1))
        return losses
