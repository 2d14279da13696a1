"""Options declared once: a settings dataclass field carries its help text, and the CLI is derived from it.

The API's settings dataclasses (``TrainOptions``, ``ClassifierSettings``, ``SegmenterSettings``,
``InferenceOptions``, ``CamSettings``, ``RasterOptions``) declare each option with :func:`setting`: its type (the annotation), its
default and one line of help. ``wsss_domains.cli.settings_arguments`` turns such fields into
command-line options, so a default or a help text is written in one place for Python and CLI users.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field
from typing import Any

HELP = "help"
CHOICES = "choices"
METAVAR = "metavar"


def setting(
    default: Any = MISSING,
    *,
    help: str,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field with the help text (and choices) its command-line option shows."""
    metadata: dict[str, Any] = {HELP: help, CHOICES: choices, METAVAR: metavar}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(item: Field) -> str:
    """The help text a field declares (empty when it is not a :func:`setting`)."""
    return str(item.metadata.get(HELP, ""))
