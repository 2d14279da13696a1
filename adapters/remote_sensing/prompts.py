"""CLIP prompts for overhead imagery, from ``prompts/remote-sensing/prompts.json`` when present.

The file is read through the engine's shared reader (:mod:`wsss_domains.clip.prompt_files`), so it
follows the schema every domain uses: per dataset ``classes`` (class -> names and synonyms),
``templates`` and ``background``. Without the file, or without an entry for the dataset, each class
is prompted by its own name in generic overhead-imagery templates.
"""

from __future__ import annotations

from wsss_domains.clip import prompt_files
from wsss_domains.domains.contract import ClipPrompts, LabelSpace

DOMAIN = "remote-sensing"
TEMPLATES = ("an aerial photo of {}.", "a satellite image of {}.", "an overhead view of {}.")
# Loader names whose entry in the prompt file goes by a shorter name.
ALIASES = {"dubai-aerial": ("dubai",)}


def clip_prompts_for(dataset: str | None, label_space: LabelSpace) -> ClipPrompts:
    """Prompts for the foreground classes of ``label_space`` as the file lists them for ``dataset``."""
    classes = label_space.foreground_names
    for name in (dataset, *ALIASES.get(dataset or "", ())) if dataset else ():
        try:
            return prompt_files.clip_prompts_from_file(DOMAIN, name, classes)
        except FileNotFoundError:
            break
        except KeyError:
            continue
    return ClipPrompts(class_names={c: (c.replace("_", " "),) for c in classes}, templates=TEMPLATES)
