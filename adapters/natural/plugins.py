"""The reference natural-image domains ``voc`` and ``coco``, scored by the community protocol."""

from __future__ import annotations

from collections.abc import Mapping

from wsss_adapters.natural import coco, voc

from wsss_domains.clip.prompt_files import clip_prompts_from_file
from wsss_domains.domains.contract import ClipPrompts, DatasetSpec, DomainPlugin, LabelSpace

# Words CLIP understands better than the datasets' spellings.
READABLE = {
    "aeroplane": ("aeroplane", "airplane"),
    "diningtable": ("dining table", "table"),
    "motorbike": ("motorbike", "motorcycle"),
    "pottedplant": ("potted plant", "houseplant"),
    "tvmonitor": ("tv monitor", "television", "computer monitor"),
    "tv": ("tv", "television"),
    "couch": ("couch", "sofa"),
}
# Scene words that are never a VOC or COCO object, so CLIP can explain background pixels.
BACKGROUND_WORDS = (
    "ground",
    "grass",
    "sky",
    "wall",
    "floor",
    "road",
    "tree",
    "building",
    "water",
    "mountain",
)
TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


def natural_prompts(label_space: LabelSpace, domain: str) -> ClipPrompts:
    """Prompts from ``prompts/<domain>/prompts.json`` (dataset ``domain``), else readable class names."""
    try:
        return clip_prompts_from_file(domain, domain, label_space.foreground_names)
    except (FileNotFoundError, ModuleNotFoundError, KeyError):
        return ClipPrompts(
            class_names={c: READABLE.get(c, (c,)) for c in label_space.foreground_names},
            templates=TEMPLATES,
            background=BACKGROUND_WORDS,
        )


class _NaturalDomain(DomainPlugin):
    """Object-centric photographs; background is what no object CAM claims.

    Community protocol, followed here: pseudo-labels are scored on the ``train`` split (VOC
    ``train``, COCO ``train2014``/``train2017``) and the final segmentation on ``val``. The
    background threshold of ``BackgroundMode.THRESHOLD`` is fixed a priori to
    :attr:`BACKGROUND_THRESHOLD` (a normalised CAM score) and must never be chosen on the split
    being scored; if it is tuned at all, tune it on a held-out part of another split and pass it
    explicitly.
    """

    BACKGROUND_THRESHOLD = 0.3

    def background_threshold(self, label_space: LabelSpace) -> float:
        return self.BACKGROUND_THRESHOLD

    def clip_prompts(self, label_space: LabelSpace) -> ClipPrompts:
        return natural_prompts(label_space, self.name)


class VocDomain(_NaturalDomain):
    """PASCAL VOC 2012: 20 object classes and background (0), void 255.

    Protocol: pseudo-labels are scored on ``train`` (1,464 images, trained on ``trainaug``),
    segmentation on ``val``. The background threshold is the fixed plugin default
    ``BACKGROUND_THRESHOLD = 0.3``, never chosen on the split being scored.
    """

    name = "voc"
    description = "PASCAL VOC 2012 segmentation (21 classes, reference benchmark)"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {voc.NAME: voc.SPEC}


class CocoDomain(_NaturalDomain):
    """MS COCO 2014/2017: 80 object classes and background (0), crowd regions ignored.

    Protocol: pseudo-labels are scored on ``train2014`` (or ``train2017``), segmentation on
    ``val2014`` (or ``val2017``). The background threshold is the fixed plugin default
    ``BACKGROUND_THRESHOLD = 0.3``, never chosen on the split being scored.
    """

    name = "coco"
    description = "MS COCO 2014/2017 instances as semantic masks (81 classes, reference benchmark)"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {coco.NAME: coco.SPEC}
