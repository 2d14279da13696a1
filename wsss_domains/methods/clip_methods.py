"""CLIP-based pseudo-labels: CLIP-ES CAMs with zero-shot or learned (PEFT) prompts.

No CLIP weights ship with the project: these methods need ``--clip-model`` and ``--clip-weights``
(a local open_clip checkpoint) and fail at set-up, before any image is processed, when there are
none. The classifier of the run still decides which classes an image holds when its split carries
no labels; the maps of the present classes come from CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.registry import register_method

DEFAULT_CLIP_MODEL = "ViT-B-16"


@register_method
class ClipEs(Method):
    name = "clip-es"
    description = (
        "CLIP-ES CAMs (GradCAM at CLIP's last block, softmax over present classes + background words, "
        "class-aware attention affinity); needs --clip-model and --clip-weights."
    )

    def __init__(
        self, clip_model: str = DEFAULT_CLIP_MODEL, clip_weights: str | None = None, **options: Any
    ) -> None:
        super().__init__(clip_model=clip_model, clip_weights=clip_weights, **options)
        self.clip_model = clip_model
        self.clip_weights = clip_weights
        self._loaded: Any = None
        self._text: dict[tuple[str, ...], Any] = {}

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        from wsss_domains.clip.loading import resolve_clip_weights

        super().setup(domain, mean, std)
        resolve_clip_weights(self.clip_model, self.clip_weights)  # fail fast, no network

    def _clip(self, device: torch.device) -> Any:
        if self._loaded is None:
            from wsss_domains.clip.loading import load_clip

            self._loaded = load_clip(self.clip_model, self.clip_weights, device=device)
        return self._loaded

    def text_source(self, loaded: Any, domain: DomainPlugin, label_space: LabelSpace) -> Any:
        """Text embeddings of the label space's classes, built once and kept across images."""
        from wsss_domains.clip.text import ZeroShotText

        key = label_space.classes
        if key not in self._text:
            self._text[key] = ZeroShotText(loaded.model, loaded.tokenizer, domain.clip_prompts(label_space))
        return self._text[key]

    def text_rows(
        self,
        loaded: Any,
        domain: DomainPlugin,
        label_space: LabelSpace,
        names: list[str],
        compete: bool = True,
    ) -> Tensor:
        """The text embeddings a CLIP-ES-style softmax competes over: ``names``' then the background words'
        (``compete``: a single row is an error, as a softmax over it would say nothing)."""
        source = self.text_source(loaded, domain, label_space)
        with torch.no_grad():
            rows = source.foreground(names).float()
            background = source.background()
            if background.numel():
                rows = torch.cat([rows, background.float()])
        if compete and rows.shape[0] == 1:
            raise ValueError(
                f"{self.name} with one present class needs a background vocabulary to compete with"
            )
        return rows

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        image, present = context.image, context.present
        domain, label_space = context.domain, context.label_space
        from wsss_domains.clip.clip_es import clip_es_cams

        keep = present.bool()
        if not keep.any():
            return cams
        loaded = self._clip(cams.device)
        names = [label_space.foreground_names[i] for i in torch.nonzero(keep).flatten().tolist()]
        prompts = domain.clip_prompts(label_space)
        maps = clip_es_cams(
            loaded.model,
            loaded.tokenizer,
            image,
            names,
            prompts,
            text=self.text_source(loaded, domain, label_space),
        )
        out = cams.clone()
        out[keep] = maps.to(out.dtype).to(out.device)
        return out


@register_method
class ClipEsLearned(ClipEs):
    name = "clip-es-learned"
    description = (
        "CLIP-ES CAMs with learned per-domain prompts (`wsss-domains prompts learn`); "
        "--method-option prompts=NAME picks the artefact (default: the domain's configured one)."
    )

    def __init__(
        self,
        prompts: str | None = None,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_weights: str | None = None,
    ) -> None:
        super().__init__(clip_model=clip_model, clip_weights=clip_weights, prompts=prompts)

    def text_source(self, loaded: Any, domain: DomainPlugin, label_space: LabelSpace) -> Any:
        from wsss_domains.clip.artefacts import load_learned_prompts
        from wsss_domains.clip.text import FrozenText

        key = label_space.classes
        if key not in self._text:
            name = self.options.get("prompts") or domain.clip_prompts(label_space).learned
            if not name:
                raise ValueError(
                    f"no learned prompts for domain '{domain.name}': run `wsss-domains prompts learn` and pass "
                    "--method-option prompts=NAME"
                )
            learned = load_learned_prompts(name, loaded.model, loaded.tokenizer, domain=domain.name)
            self._text[key] = FrozenText(learned)  # fixed while pseudo-labelling: encode each class once
        return self._text[key]


@register_method
class MaskClip(ClipEs):
    name = "maskclip"
    description = (
        "MaskCLIP dense CLIP labels (the value path of the last block, projected, cosine with each present "
        "class's text; softmax with logit scale over the present classes and background words), the "
        "pseudo-labels CARB starts from; needs --clip-model and --clip-weights."
    )
    deviations = (
        "Official (CARB's gen_clip_mask): the arg-max of cosine x image labels over all classes, so where every "
        "present class's cosine is negative an absent class wins; here the maps are a softmax (logit scale) over "
        "the present classes and the domain's background words, so the engine's arg-max and background rule "
        "apply. Prompts are the domain's (official: CLIP's ImageNet templates)."
    )

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        import math

        from torch.nn import functional as F

        from wsss_domains.clip.maskclip import dense_features
        from wsss_domains.clip.vit import patch_size, prepare_pixels, vision_transformer

        keep = context.present.bool()
        if not keep.any():
            return cams
        label_space = context.label_space
        loaded = self._clip(cams.device)
        visual = vision_transformer(loaded.model)
        image = context.prepared if context.prepared is not None else context.image
        height, width = int(image.shape[-2]), int(image.shape[-1])
        ph, pw = patch_size(visual)
        size = (math.ceil(height / ph) * ph, math.ceil(width / pw) * pw)
        features, _ = dense_features(visual, prepare_pixels(loaded.model, image, size))
        names = [label_space.foreground_names[i] for i in torch.nonzero(keep).flatten().tolist()]
        rows = F.normalize(
            self.text_rows(loaded, context.domain, label_space, names, compete=False), dim=-1
        ).to(features.device)
        scores = torch.einsum("bchw,kc->bkhw", features, rows)
        # Resized before the softmax, as the official cosines are before their arg-max.
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        probs = (loaded.model.logit_scale.exp().float() * scores).softmax(1)[0, : len(names)]
        out = cams.clone()
        out[keep] = probs.to(out.dtype).to(out.device)
        return out
