"""CLIP prompts for histology, read from ``prompts/histo/prompts.json`` (package ``wsss_prompts``).

Kept in data rather than code so prompt wording can be tuned without touching the plugin.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from typing import Any

from wsss_domains.domains.contract import ClipPrompts, LabelSpace


@lru_cache(maxsize=1)
def load_prompt_file() -> dict[str, Any]:
    """The parsed prompts file."""
    resource = files("wsss_prompts").joinpath("histo", "prompts.json")
    return json.loads(resource.read_text(encoding="utf-8"))


def clip_prompts_for(dataset: str | None, label_space: LabelSpace) -> ClipPrompts:
    """Prompts for the foreground classes of ``label_space``; class names where none are listed."""
    data = load_prompt_file()
    entry = data["datasets"].get(dataset or "", {})
    listed = entry.get("classes", {})
    names = {c: tuple(listed.get(c) or (c.replace("_", " "),)) for c in label_space.foreground_names}
    return ClipPrompts(
        class_names=names,
        templates=tuple(data["templates"]),
        background=tuple(entry.get("background", data["background"])),
    )
