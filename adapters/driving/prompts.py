"""CLIP prompts for street scenes: ``prompts/driving/prompts.json`` when installed, else class names.

The file (package ``wsss_prompts``, read by the engine's prompt-file reader) holds one entry per
dataset; the entry is chosen from the label space, since the hook receives no dataset name.
Without the file, classes are prompted by readable forms of their names.
"""

from __future__ import annotations

from wsss_adapters.driving.labels import CAMVID, CITYSCAPES

from wsss_domains.clip.prompt_files import clip_prompts_from_file
from wsss_domains.domains.contract import ClipPrompts, LabelSpace

DOMAIN = "driving"
TEMPLATES = ("a photo of {} in a street scene.",)
# CamVid's SegNet class names, as words CLIP knows (used only without the prompt file).
READABLE = {
    "SignSymbol": ("traffic sign", "sign"),
    "Pavement": ("sidewalk", "pavement"),
    "Bicyclist": ("cyclist", "person riding a bicycle"),
}


def _dataset_of(label_space: LabelSpace) -> str | None:
    for name, known in (("cityscapes", CITYSCAPES), ("camvid", CAMVID)):
        if label_space.classes == known.classes:
            return name
    return None


def class_name_prompts(label_space: LabelSpace) -> ClipPrompts:
    """Readable class names in a street-scene template."""
    return ClipPrompts(
        class_names={c: READABLE.get(c, (c.lower(),)) for c in label_space.foreground_names},
        templates=TEMPLATES,
    )


def street_prompts(label_space: LabelSpace) -> ClipPrompts:
    """Prompts for the foreground classes of ``label_space``, from the prompt file when it has them."""
    dataset = _dataset_of(label_space)
    if dataset is None:
        return class_name_prompts(label_space)
    try:
        return clip_prompts_from_file(DOMAIN, dataset, label_space.foreground_names)
    except (FileNotFoundError, ModuleNotFoundError, KeyError):
        return class_name_prompts(label_space)
