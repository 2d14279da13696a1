"""Command-line options derived from the API's settings dataclasses (see :mod:`wsss_domains.settings`).

A field ``max_minutes: float | None = setting(None, help=...)`` becomes ``--max-minutes`` of type
``float`` with that default and help (a ``tuple[float, ...]`` is typed comma-separated); a ``bool`` field that defaults to ``False`` becomes a switch,
one that defaults to ``True`` becomes ``--no-<name>``. A command may rename a flag (``segment``'s
``--seg-batch-size`` for the segmenter's ``batch_size``) or give its own default; the values are read
back into the same fields with :meth:`SettingsArguments.values`.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from wsss_domains.settings import CHOICES, METAVAR, help_of

_SCALARS = (int, float, str, Path)


@dataclass(frozen=True)
class _CommaSeparated:
    """argparse ``type`` of a ``tuple[float, ...]`` field: ``--scales 1,0.5`` -> ``(1.0, 0.5)``."""

    item: type

    def __call__(self, text: str) -> tuple[Any, ...]:
        try:
            return tuple(self.item(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {self.item.__name__} values, got '{text}'"
            ) from None


def _scalar_type(annotation: Any, where: str) -> tuple[Any, tuple[Any, ...] | None]:
    """``int`` of ``int | None`` and so on, with the choices of a ``Literal``; nothing else fits a flag.

    A ``tuple[float, ...]`` (or of another scalar) is typed comma-separated.
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(kinds) == 1:
            annotation = kinds[0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        kinds = {type(choice) for choice in choices}
        if len(kinds) == 1 and kinds <= set(_SCALARS):
            return kinds.pop(), choices
    if annotation is bool or annotation in _SCALARS:
        return annotation, None
    args = typing.get_args(annotation)
    if (
        typing.get_origin(annotation) is tuple
        and len(args) == 2
        and args[1] is Ellipsis
        and args[0] in _SCALARS
    ):
        return _CommaSeparated(args[0]), None
    raise TypeError(
        f"{where}: a command-line option needs a bool, int, float, str Path field or a tuple of one of them, not {annotation}"
    )


@dataclass(frozen=True)
class _Option:
    name: str  # the field
    flag: str
    dest: str
    negated: bool  # --no-<name> of a field that defaults to True


@dataclass(frozen=True)
class SettingsArguments:
    """Which fields of ``cls`` a command offers, and under which flags (default: ``--field-name``)."""

    cls: type
    names: tuple[str, ...]
    flags: Mapping[str, str] = field(default_factory=dict)

    def _options(self) -> list[_Option]:
        hints = typing.get_type_hints(self.cls)
        declared = {item.name: item for item in fields(self.cls)}
        options = []
        for name in self.names:
            if name not in declared:
                raise KeyError(f"{self.cls.__name__} has no field '{name}'")
            negated = hints[name] is bool and declared[name].default is True
            flag = self.flags.get(name) or ("--no-" if negated else "--") + name.replace("_", "-")
            options.append(_Option(name, flag, flag.lstrip("-").replace("-", "_"), negated))
        return options

    def add(
        self,
        target: argparse.ArgumentParser | argparse._ArgumentGroup,
        *,
        defaults: Mapping[str, Any] | None = None,
        helps: Mapping[str, str] | None = None,
        hidden: Iterable[str] = (),
        absent_unless_given: bool = False,
    ) -> None:
        """Add the options to ``target``; ``defaults`` and ``helps`` override a field's for this command.

        ``absent_unless_given``: an option not typed is left out of the parsed namespace (argparse's
        ``SUPPRESS``), so a command can refuse options that do not apply to the input it was given.
        """
        hints = typing.get_type_hints(self.cls)
        declared = {item.name: item for item in fields(self.cls)}
        defaults, helps, hidden = defaults or {}, helps or {}, set(hidden)
        for option in self._options():
            item = declared[option.name]
            kind, literal = _scalar_type(hints[option.name], f"{self.cls.__name__}.{option.name}")
            text = argparse.SUPPRESS if option.name in hidden else helps.get(option.name, help_of(item))
            quiet = {"default": argparse.SUPPRESS} if absent_unless_given else {}
            if kind is bool:
                target.add_argument(option.flag, dest=option.dest, action="store_true", help=text, **quiet)
                continue
            default = defaults.get(option.name, None if item.default is MISSING else item.default)
            if isinstance(kind, _CommaSeparated) and isinstance(default, tuple):
                default = ",".join(
                    f"{value:g}" if isinstance(value, float) else str(value) for value in default
                )
            extra = {key: item.metadata.get(key) for key in (CHOICES, METAVAR) if item.metadata.get(key)}
            if literal and CHOICES not in extra:
                extra[CHOICES] = literal
            extra = {"default": default, **extra, **quiet}
            target.add_argument(option.flag, dest=option.dest, type=kind, help=text, **extra)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The fields' values as parsed (a ``--no-`` switch read back as the field's ``False``).

        Options absent from the namespace (not typed, ``absent_unless_given``) are left out, so the
        dataclass's defaults apply.
        """
        read = {}
        for option in self._options():
            if hasattr(args, option.dest):
                value = getattr(args, option.dest)
                read[option.name] = not value if option.negated else value
        return read

    def build(self, args: argparse.Namespace, **extra: Any) -> Any:
        """``cls`` built from the parsed values (and ``extra`` fields); its checks' errors name the flag.

        A settings class's ``ValueError`` starts with the field's name ("scales must ..."); here
        the flag replaces it ("--scales must ..."), so a command-line user reads the option they typed.
        """
        try:
            return self.cls(**self.values(args), **extra)
        except ValueError as exc:
            message = str(exc)
            for option in self._options():
                if message.startswith(f"{option.name} "):
                    raise ValueError(option.flag + message[len(option.name) :]) from exc
            raise

    def given(self, args: argparse.Namespace) -> list[str]:
        """The flags of this group present in ``args`` (typed, where ``absent_unless_given``)."""
        return [option.flag for option in self._options() if hasattr(args, option.dest)]
