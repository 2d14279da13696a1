"""POLE: prompt class learning (Murugesan et al., WACV 2024), CLIMS with the class word picked per image.

Why: CLIP's text side decides what CLIMS pulls the CAM towards, and the class name a dataset
happens to use ("tvmonitor", "stroma") is often not the word CLIP matches best to what the image
shows. POLE keeps CLIMS's losses and, for every (image, present class) pair, replaces the class
name by the synonym CLIP finds most similar to the image masked by the class's CAM. For imagery
far from CLIP's training data this choice matters more: the domain's prompt file lists the names
and synonyms a pathologist or analyst would use, and POLE lets CLIP pick among them per image.

Follows Ruxie189/WSS_POLE:

* ``clip_selection.py``: per image and present class, the baseline's high-resolution CAM
  (``make_cam.py``: ReLU maps upsampled to the image, each over its maximum + 1e-5) multiplies the
  image's pixels (black outside); CLIP's ``logits_per_image`` against ``"A photo of {name}."`` for
  each candidate name of the class, softmax, arg-max (the first candidate on ties). The softmax
  does not change the arg-max, so here it is the highest cosine similarity;
* ``clip_utils.clip_forward`` (the per-image branch, ``mode``): the chosen text itself is the text
  of the pair's object and background region-text matching;
* ``step/train_clims.py`` with ``run_CLIMS.sh``: ``10·L_OTM + 25·L_BTM + 1·L_CBS`` (``--hyper
  10.0,25.0,1.0,0.0``; the loop has no area term), CLIMS's losses (:mod:`~wsss_domains.methods.clims`),
  the background words of CLIMS's ``"a photo of {word}."``, threshold 0.26.

The candidates per class are the domain's CLIP prompt names (:meth:`DomainPlugin.clip_prompts`,
the class's own name first, as POLE's lists start with it), or the ``synonyms`` option
(``--method-option 'synonyms={"tumor": ["tumor", "carcinoma"]}'``). A class with one name has
nothing to choose: its pairs are plain CLIMS pairs.

Deviations (also :attr:`Pole.deviations`) besides CLIMS's own (one run with the classification
loss kept, a timm CNN, CLIP's statistics, an open_clip model): the choice is made at every step on
the training crop with the run's own current CAM, detached (official: once per image, before the
CLIMS run, with the baseline run's CAM on the whole image; in this one-run design the model when the
CLIP terms start is that baseline); the masked image is resized to CLIP's input bilinearly, not by
CLIP's resize and centre crop; the official script multiplies the masked 0-255 image by 255 again
before its 8-bit conversion (overflowing) and reads it in BGR order: here the intended product of
the RGB image and the map. The published ``clip_forward`` has the per-image branch switched off
(a fixed synonym per class, ``--clims_texts``); the paper's method is the per-image choice built here.
The paper's lightweight adapters (``net/resnet50_clims_adapt.py``: a bottleneck on the classifier's
features and one on CLIP's text embeddings) are not built: the published run script trains without
them (``--clims_network net.resnet50_clims --clims_use_adapter False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from wsss_domains.domains.contract import DomainPlugin
from wsss_domains.methods.clims import TEMPLATE, Clims, encode_images, encode_texts
from wsss_domains.methods.registry import register_method

SELECTION_TEMPLATE = "A photo of {}."  # clip_selection.py
HYPER = (10.0, 25.0, 1.0, 0.0)  # run_CLIMS.sh: --hyper 10.0,25.0,1.0,0.0 (OTM, BTM, CBS; no REG term)


def max_normalised_maps(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """``make_cam.py``'s high-resolution CAMs: ReLU, bilinear upsampling, each map over its maximum + 1e-5."""
    maps = F.interpolate(F.relu(cams), size=size, mode="bilinear", align_corners=False)
    return maps / (F.adaptive_max_pool2d(maps, (1, 1)) + 1e-5)


def select_synonyms(
    image_features: Tensor, candidate_features: Tensor, candidate_class: Tensor, pair_class: Tensor
) -> Tensor:
    """For each pair, the index of the candidate of its class most similar to its masked image.

    ``image_features`` (``P x C``) and ``candidate_features`` (``M x C``) are L2-normalised;
    ``candidate_class`` (``M``) says whose candidate each row is, ``pair_class`` (``P``) each pair's
    class. Ties go to the first candidate (NumPy's arg-max, as the official script).
    """
    similarity = image_features @ candidate_features.t()
    own = candidate_class[None, :] == pair_class[:, None]
    return similarity.masked_fill(~own, float("-inf")).argmax(dim=1)


@register_method
class Pole(Clims):
    name = "pole"
    description = (
        "POLE (Murugesan et al., WACV 2024): CLIMS whose class text is, per image and present class, the "
        "synonym CLIP matches best to the CAM-masked image (candidates: the domain's prompt names or the "
        "synonyms option); needs --clip-model and --clip-weights."
    )
    deviations = (
        "CLIMS's deviations (one run keeping the classification loss, a timm CNN, CLIP's statistics, an "
        "open_clip model). The synonym is chosen at every step on the training crop from the run's own "
        "detached CAM (official: once per image before training, from the baseline run's CAM on the whole "
        "image); the masked image resized bilinearly to CLIP's input (official: CLIP's preprocessing); the "
        "official script's 8-bit overflow and BGR order not reproduced. The published clip_forward uses a "
        "fixed synonym per class; the per-image choice of the paper is built here. The paper's image and text "
        "adapters are left out, as the published run script leaves them out."
    )
    background_template = TEMPLATE  # clip_utils.background_dict: "a photo of {word}."

    def __init__(
        self,
        btm_weight: float = HYPER[1],
        reg_weight: float = HYPER[3],
        template: str = SELECTION_TEMPLATE,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        **options: Any,
    ) -> None:
        """POLE's own defaults where they differ from CLIMS's; CLIMS's other options pass through."""
        super().__init__(btm_weight=btm_weight, reg_weight=reg_weight, template=template, **options)
        if synonyms is not None:
            if not isinstance(synonyms, Mapping) or not all(
                isinstance(v, Sequence)
                and not isinstance(v, str)
                and len(v) > 0
                and all(isinstance(n, str) for n in v)
                for v in synonyms.values()
            ):
                raise ValueError(
                    "pole: synonyms must map each class to a non-empty list of names, "
                    f'e.g. \'{{"tumor": ["tumor", "carcinoma"]}}\', got {synonyms!r}'
                )
            synonyms = {str(k): tuple(v) for k, v in synonyms.items()}
        self.options["synonyms"] = None if synonyms is None else {k: list(v) for k, v in synonyms.items()}
        self.synonyms = synonyms
        self._candidates: dict[tuple[int, str], tuple[Tensor, Tensor, list[str]]] = {}
        self.last_choice: list[str] = []  # the texts chosen at the last step, pair by pair (for inspection)

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        super().setup(domain, mean, std)
        self._candidates.clear()  # another domain names other candidates

    def candidates(self, num_classes: int) -> list[tuple[str, ...]]:
        """Each classifier output's candidate names: the ``synonyms`` option's, else the domain's prompt names."""
        space = self.label_space(num_classes)
        assert self.domain is not None
        names = space.foreground_names
        if self.synonyms is not None:
            unknown = sorted(set(self.synonyms) - set(names))
            if unknown:
                raise ValueError(
                    f"pole: synonyms name unknown classes {unknown}; the classes are {list(names)}"
                )
        prompts = self.domain.clip_prompts(space)
        chosen = []
        for name in names:
            given = (self.synonyms or {}).get(name) or prompts.class_names.get(name) or (name,)
            chosen.append(tuple(given))
        return chosen

    def candidate_features(
        self, loaded: Any, num_classes: int, device: torch.device
    ) -> tuple[Tensor, Tensor, list[str]]:
        """Every candidate's text embedding, the class each belongs to, and the texts (computed once)."""
        key = (num_classes, str(device))
        if key not in self._candidates:
            candidates = self.candidates(num_classes)
            texts = [self.template.format(n) for names in candidates for n in names]
            owner = [k for k, names in enumerate(candidates) for _ in names]
            self._candidates[key] = (
                encode_texts(loaded.model, loaded.tokenizer, texts),
                torch.tensor(owner, device=device),
                texts,
            )
        return self._candidates[key]

    def pair_text_features(self, loaded: Any, cams: Tensor, clip_images: Tensor, pairs: Tensor) -> Tensor:
        """The chosen synonym's embedding per pair (``clip_selection.py`` on the current, detached CAM)."""
        from wsss_domains.clip.loading import clip_mean_std

        features, owner, texts = self.candidate_features(loaded, cams.shape[1], cams.device)
        mean, std = (clip_images.new_tensor(v)[:, None, None] for v in clip_mean_std(loaded.model))
        with torch.no_grad():
            # Back to [0, 1], so that the map blackens what it leaves out, as officially.
            pixels = clip_images[pairs[:, 0]] * std + mean
            maps = max_normalised_maps(cams.detach(), tuple(clip_images.shape[-2:]))[pairs[:, 0], pairs[:, 1]]
            masked = (maps.unsqueeze(1) * pixels - mean) / std
            choice = select_synonyms(encode_images(loaded.model, masked), features, owner, pairs[:, 1])
        self.last_choice = [texts[int(i)] for i in choice]
        return features[choice]
