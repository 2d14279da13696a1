"""The class declaration of a custom folder dataset: ``classes.json`` or ``classes.txt``.

``classes.json`` is either a list of class names or an object::

    {"classes": ["background", "crack", {"name": "rust", "color": [200, 80, 0]}],
     "background": "background", "background_mode": "threshold", "ignore_index": 255}

``background`` names the background class (optional); ``background_mode`` is ``none``,
``threshold`` or ``exclude`` and defaults to ``threshold`` when there is a background class,
``none`` otherwise. ``classes.txt`` lists one class per line, optionally followed by a colour as
``#rrggbb``; a class called ``background`` is the background class. Classes without a colour
get distinct generated ones.
"""

from __future__ import annotations

import colorsys
import json
import re
from pathlib import Path
from typing import Any

from wsss_domains.data.io import DataError
from wsss_domains.domains.contract import IGNORE_INDEX, BackgroundMode, LabelSpace

CLASS_FILES = ("classes.json", "classes.txt")
_TXT_LINE = re.compile(r"^(?P<name>.+?)(?:\s+#(?P<hex>[0-9a-fA-F]{6}))?$")


def generated_color(index: int) -> tuple[int, int, int]:
    """A colour far from its neighbours (golden-angle hues); index 0 is black for background."""
    if index == 0:
        return (0, 0, 0)
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95 if index % 2 else 0.7)
    return round(r * 255), round(g * 255), round(b * 255)


def _color(value: Any, path: Path, name: str) -> tuple[int, int, int]:
    if isinstance(value, str) and re.fullmatch(r"#?[0-9a-fA-F]{6}", value):
        h = value.lstrip("#")
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(v, int) and 0 <= v <= 255 for v in value)
    ):
        return value[0], value[1], value[2]
    raise DataError(path, f"colour of class {name!r} must be [r, g, b] in 0..255 or '#rrggbb', got {value!r}")


def _from_json(path: Path) -> tuple[list[str], list[tuple[int, int, int] | None], dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc})") from exc
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise DataError(path, "expected a list of classes or an object with a 'classes' list")
    names, colors = [], []
    for entry in data["classes"]:
        if isinstance(entry, str):
            names.append(entry)
            colors.append(None)
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names.append(entry["name"])
            colors.append(_color(entry["color"], path, entry["name"]) if "color" in entry else None)
        else:
            raise DataError(path, f"class entry {entry!r} must be a name or {{'name': ..., 'color': ...}}")
    return names, colors, data


def _from_txt(path: Path) -> tuple[list[str], list[tuple[int, int, int] | None], dict[str, Any]]:
    names, colors = [], []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _TXT_LINE.match(line)
        assert match is not None  # the pattern accepts any non-empty line
        names.append(match["name"])
        colors.append(_color(match["hex"], path, match["name"]) if match["hex"] else None)
    background = next((n for n in names if n.lower() == "background"), None)
    return names, colors, {"background": background} if background else {}


def class_file(root: Path) -> Path | None:
    return next((root / n for n in CLASS_FILES if (root / n).is_file()), None)


def read_label_space(root: Path) -> LabelSpace:
    """The label space declared in ``root/classes.json`` (or ``classes.txt``)."""
    path = class_file(Path(root))
    if path is None:
        raise DataError(Path(root) / CLASS_FILES[0], "class list not found (classes.json or classes.txt)")
    names, colors, options = _from_json(path) if path.suffix == ".json" else _from_txt(path)
    if not names:
        raise DataError(path, "declares no class")
    if len(set(names)) != len(names):
        raise DataError(path, "class names must be unique")
    background = options.get("background")
    if background is not None and background not in names:
        raise DataError(path, f"background class {background!r} is not among the classes")
    mode_name = options.get("background_mode", "threshold" if background else "none")
    try:
        mode = BackgroundMode(mode_name)
    except ValueError as exc:
        modes = ", ".join(m.value for m in BackgroundMode)
        raise DataError(path, f"background_mode {mode_name!r} is not one of {modes}") from exc
    palette = tuple(c if c is not None else generated_color(i) for i, c in enumerate(colors))
    try:
        return LabelSpace(
            classes=tuple(names),
            palette=palette,
            background_mode=mode,
            background_index=names.index(background) if background else None,
            ignore_index=int(options.get("ignore_index", IGNORE_INDEX)),
        )
    except ValueError as exc:
        raise DataError(path, str(exc)) from exc
