"""CLIP prompts for overhead imagery: ``prompts/remote-sensing/prompts.json`` if installed.

The file (package ``wsss_prompts``) follows the layout of the other domains' prompt files: shared
``templates`` and ``background``, and per dataset ``datasets.<name>.classes`` (class -> names and
synonyms), optionally with its own ``templates``, ``background`` and ``learned``. Without the
file, or for classes it does not list, the class name itself is the prompt, in generic
overhead-imagery templates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from wsss_domains.domains.contract import ClipPrompts, LabelSpace

DOMAIN = "remote-sensing"
TEMPLATES = ("an aerial photo of {}.", "a satellite image of {}.", "an overhead view of {}.")


def prompt_file() -> Mapping[str, Any]:
    """The parsed prompts file, or an empty mapping when it is absent or unreadable."""
    try:
        path = resources.files("wsss_prompts").joinpath(DOMAIN, "prompts.json")
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, Mapping) else {}


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def clip_prompts_for(
    dataset: str | None, label_space: LabelSpace, data: Mapping[str, Any] | None = None
) -> ClipPrompts:
    """Prompts for the foreground classes of ``label_space`` as listed for ``dataset``."""
    data = prompt_file() if data is None else data
    datasets = data.get("datasets", {})
    entry = datasets.get(dataset or "", {}) if isinstance(datasets, Mapping) else {}
    listed = entry.get("classes", {}) if isinstance(entry, Mapping) else {}
    names = {c: _names(listed.get(c)) or (c.replace("_", " "),) for c in label_space.foreground_names}
    learned = entry.get("learned", data.get("learned"))
    return ClipPrompts(
        class_names=names,
        templates=_names(entry.get("templates")) or _names(data.get("templates")) or TEMPLATES,
        background=_names(entry.get("background")) or _names(data.get("background")),
        learned=learned if isinstance(learned, str) else None,
    )
