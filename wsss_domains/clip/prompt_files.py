"""Per-domain prompt files: ``prompts/<domain>/prompts.json`` read through ``importlib.resources``.

Schema (shared by every domain, histopathology included)::

    {"datasets": {"<dataset>": {"classes": {"<class>": ["name", "synonym", ...]},
                                 "templates": ["... {} ..."], "background": ["word", ...]}}}

``templates`` and ``background`` may also sit at the top level as defaults for every dataset (the
histopathology file shares them); a dataset's own entries override them. Other keys (``"about"``)
are ignored.
Dataset and class lookups ignore case and punctuation (``"SignSymbol"`` finds ``"sign symbol"``),
since loaders spell class names as their datasets do.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from importlib import resources
from typing import Any

from wsss_domains.domains.contract import ClipPrompts

PACKAGE = "wsss_prompts"
FILE_NAME = "prompts.json"


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _validate(domain: str, data: Any) -> dict[str, Any]:
    where = f"{PACKAGE}/{domain}/{FILE_NAME}"
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict) or not data["datasets"]:
        raise ValueError(f"{where}: expected {{'datasets': {{name: {{...}}}}}}")
    for name, entry in data["datasets"].items():
        classes = entry.get("classes") if isinstance(entry, dict) else None
        if not isinstance(classes, dict) or not classes:
            raise ValueError(f"{where}: dataset '{name}' needs a non-empty 'classes' mapping")
        for cls, names in classes.items():
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{where}: class '{cls}' of '{name}' needs a list of names")
        templates = _resolved(data, entry, "templates")
        if not isinstance(templates, list) or not templates or not all(t.count("{}") == 1 for t in templates):
            raise ValueError(f"{where}: dataset '{name}' needs templates, each with one '{{}}'")
        background = _resolved(data, entry, "background")
        if background is not None and not (
            isinstance(background, list) and all(isinstance(w, str) and w for w in background)
        ):
            raise ValueError(f"{where}: 'background' of '{name}' must be a list of words")
    return data


def _resolved(data: dict[str, Any], entry: dict[str, Any], key: str) -> Any:
    """A dataset's own ``key``, else the file-wide default."""
    return entry[key] if key in entry else data.get(key)


def prompt_file_domains() -> list[str]:
    """Domains that ship a prompt file."""
    root = resources.files(PACKAGE)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / FILE_NAME).is_file())


def load_prompt_file(domain: str) -> dict[str, Any]:
    """The validated prompt file of ``domain``."""
    path = resources.files(PACKAGE) / domain / FILE_NAME
    if not path.is_file():
        known = ", ".join(prompt_file_domains()) or "none"
        raise FileNotFoundError(
            f"no prompt file for domain '{domain}' ({PACKAGE}/{domain}/{FILE_NAME}); have: {known}"
        )
    return _validate(domain, json.loads(path.read_text(encoding="utf-8")))


def clip_prompts_from_file(
    domain: str, dataset: str, class_names: Sequence[str] | None = None, learned: str | None = None
) -> ClipPrompts:
    """:class:`ClipPrompts` for ``dataset`` of ``domain``, keyed by the loader's ``class_names``.

    A class the file does not know is prompted by its own name, with a warning.
    """
    data = load_prompt_file(domain)
    datasets = data["datasets"]
    by_key = {_key(name): entry for name, entry in datasets.items()}
    if _key(dataset) not in by_key:
        raise KeyError(f"prompt file of '{domain}' has no dataset '{dataset}'; has: {', '.join(datasets)}")
    entry = by_key[_key(dataset)]
    classes = {_key(name): names for name, names in entry["classes"].items()}
    wanted = list(entry["classes"]) if class_names is None else list(class_names)
    mapping: dict[str, tuple[str, ...]] = {}
    unknown = []
    for name in wanted:
        names = classes.get(_key(name))
        if names is None:
            unknown.append(name)
            names = [name]
        mapping[name] = tuple(names)
    if unknown:
        warnings.warn(
            f"{domain}/{dataset}: no prompt for {', '.join(unknown)}; using the class names", stacklevel=2
        )
    return ClipPrompts(
        class_names=mapping,
        templates=tuple(_resolved(data, entry, "templates")),
        background=tuple(_resolved(data, entry, "background") or ()),
        learned=learned,
    )
