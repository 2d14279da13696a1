"""CLIP prompts for street scenes: ``prompts/driving/prompts.json`` when installed, else class names.

The JSON file (package ``wsss_prompts``) may hold ``class_names`` (class -> name or list of
names and synonyms), ``templates``, ``background`` and ``learned``; classes it does not mention
fall back to their readable names, so one file serves both Cityscapes and CamVid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from wsss_domains.domains.contract import ClipPrompts, LabelSpace

TEMPLATES = ("a photo of a {} in a street scene.", "a photo of the {}.")
# CamVid's SegNet class names, as words CLIP knows.
READABLE = {
    "SignSymbol": ("traffic sign", "sign"),
    "Pavement": ("sidewalk", "pavement"),
    "Bicyclist": ("cyclist", "person riding a bicycle"),
    "Pole": ("pole",),
    "Tree": ("tree", "vegetation"),
}


def _packaged(domain: str) -> Mapping[str, Any] | None:
    try:
        path = resources.files("wsss_prompts").joinpath(domain, "prompts.json")
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (ModuleNotFoundError, FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, Mapping) else None


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value) and value:
        return tuple(value)  # type: ignore[arg-type]
    return ()


def street_prompts(label_space: LabelSpace, domain: str = "driving") -> ClipPrompts:
    """Prompts for the foreground classes of ``label_space``."""
    data = _packaged(domain) or {}
    given = data.get("class_names", data.get("classes", {}))
    given = {str(k).lower(): v for k, v in given.items()} if isinstance(given, Mapping) else {}
    names = {}
    for cls in label_space.foreground_names:
        names[cls] = _names(given.get(cls.lower())) or READABLE.get(cls) or (cls.lower(),)
    templates = _names(data.get("templates")) or TEMPLATES
    learned = data.get("learned")
    return ClipPrompts(
        class_names=names,
        templates=templates,
        background=_names(data.get("background")),
        learned=learned if isinstance(learned, str) else None,
    )
