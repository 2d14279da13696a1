"""A method's (or a domain plugin's) options are its constructor's keyword parameters: named, typed,
with defaults.

Why: options arrive as text (``--method-option fuse_weight=0.7``, bench cells, run.json), and a
misspelt name (``fuse_wieght``) or a value of the wrong type must fail at once, naming the method
and the options it knows, instead of being read with ``.get()`` and silently ignored. Reading the
signature (as timm's ``create_model`` refuses unknown keyword arguments) keeps one source of truth:
no separate option table to forget when a parameter is added.

A constructor that forwards ``**options`` to its base class (``PPC(gamma, **seam_options)``) takes
its base's parameters too; the walk along the class hierarchy stops at the first constructor without
``**`` or at :class:`~wsss_domains.methods.base.Method` itself, which takes none.

Domain plugins declare their options the same way (``HistoDomain(stain="macenko")``, from
``--domain-option stain=macenko``); :mod:`wsss_domains.domains.registry` checks them with this module.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wsss_domains.errors import UserError


class OptionError(UserError, ValueError):
    """An option the method (or domain) does not take, or a value of the wrong type."""


# The name this error has always had; domain options raise the same class.
MethodOptionError = OptionError


@dataclass(frozen=True)
class OptionSpec:
    """One keyword parameter of a method: its name, type annotation and default."""

    name: str
    annotation: Any  # the evaluated type hint; ``Any`` when none could be read
    default: Any

    def describe(self) -> str:
        default = "required" if self.default is inspect.Parameter.empty else f"default {self.default!r}"
        return f"{self.name} ({type_name(self.annotation)}, {default})"


def type_name(annotation: Any) -> str:
    """A short readable name of a type hint (``float``, ``list[int]``, ``str | None``)."""
    if annotation is Any:
        return "any"
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


def _hints(function: Any) -> dict[str, Any]:
    """Each parameter's evaluated annotation; one naming a type imported only for type checking
    (``LoadedSam``) cannot be evaluated and becomes ``Any``, the others keep their types."""
    hints: dict[str, Any] = {}
    namespace = {**vars(typing), **getattr(function, "__globals__", {})}
    for name, annotation in getattr(function, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:
            hints[name] = Any
    return hints


def constructor_options(cls: type, stop: type) -> dict[str, OptionSpec]:
    """The keyword parameters ``cls(...)`` accepts, walking up while constructors forward ``**``."""
    found: dict[str, OptionSpec] = {}
    for klass in cls.__mro__:
        if klass is stop or klass is object:
            break
        if "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        hints = _hints(init)
        forwards = False
        for param in list(inspect.signature(init).parameters.values())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL and param.name not in found:
                found[param.name] = OptionSpec(param.name, hints.get(param.name, Any), param.default)
        if not forwards:
            break
    return found


def check_options(
    owner: str, specs: Mapping[str, OptionSpec], options: Mapping[str, Any], what: str = "method"
) -> dict[str, Any]:
    """``options`` with every value converted to its parameter's type; unknown names refused.

    ``owner`` names the method (or domain: ``what``) in messages. Values arrive JSON-decoded (numbers, strings, lists,
    booleans), so an integer is accepted where a float is declared and a list where a sequence is.
    """
    unknown = [name for name in options if name not in specs]
    if unknown:
        known = "; ".join(spec.describe() for spec in specs.values()) or "none"
        raise OptionError(
            f"{what} '{owner}' has no option {', '.join(repr(n) for n in unknown)}; its options: {known}"
        )
    checked: dict[str, Any] = {}
    for name, value in options.items():
        annotation = specs[name].annotation
        try:
            checked[name] = convert(value, annotation)
        except (TypeError, ValueError):
            raise OptionError(
                f"{what} '{owner}': option '{name}' expects {type_name(annotation)}, got {value!r}"
            ) from None
    return checked


def convert(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` says, or TypeError/ValueError; unknown annotations pass it as is."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{value!r} matches none of {annotation}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{value!r} is not one of {args}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{value!r} is not a boolean")
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{value!r} is not an integer")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{value!r} is not a number")
        return float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{value!r} is not a string")
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{value!r} is not a list")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):  # a fixed-length tuple: one type per position
                raise ValueError(f"expects {len(args)} values, got {len(value)}")
            return tuple(convert(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        converted = [convert(v, item) for v in value]
        return tuple(converted) if origin is tuple else converted
    return value
