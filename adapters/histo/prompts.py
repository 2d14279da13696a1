"""CLIP prompts for histology, read from ``prompts/histo/prompts.json`` (package ``wsss_prompts``).

Kept in data rather than code so prompt wording can be tuned without touching the plugin; the
engine's prompt-file reader validates the file and resolves shared templates and background words.
"""

from __future__ import annotations

from wsss_domains.clip.prompt_files import clip_prompts_from_file, load_prompt_file
from wsss_domains.domains.contract import ClipPrompts, LabelSpace

DOMAIN = "histo"


def clip_prompts_for(dataset: str | None, label_space: LabelSpace) -> ClipPrompts:
    """Prompts for the foreground classes of ``label_space``; its class names if the file lacks it."""
    if dataset is not None:
        return clip_prompts_from_file(DOMAIN, dataset, label_space.foreground_names)
    data = load_prompt_file(DOMAIN)
    return ClipPrompts(
        class_names={c: (c.replace("_", " "),) for c in label_space.foreground_names},
        templates=tuple(data["templates"]),
        background=tuple(data["background"]),
    )
