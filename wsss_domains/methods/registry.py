"""Name-based registry of WSSS methods (``wsss-domains methods``, ``--method NAME``).

Built-in methods register with :func:`register_method` when their module is imported. A
third-party package adds its own through the ``wsss_domains.methods`` entry-point group, as domain
plugins do (``my-method = "my_package.methods:MyMethod"``); it is loaded when first named.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from wsss_domains.methods.base import Method

ENTRY_POINT_GROUP = "wsss_domains.methods"

_METHODS: dict[str, type[Method]] = {}


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(name: str) -> type[Method]:
    """The class an installed package registers as method ``name``, checked before it is used."""
    loaded = _entry_points()[name].load()
    if not (isinstance(loaded, type) and issubclass(loaded, Method)):
        raise TypeError(f"entry point '{name}' ({_entry_points()[name].value}) is not a Method subclass")
    if loaded.name != name:
        raise ValueError(f"entry point '{name}' loads a method named '{loaded.name}'; the names must agree")
    return register_method(loaded)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under its ``name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method '{cls.name}' is already registered")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Built-in and installed method names (installed ones are not imported to be listed)."""
    return sorted(set(_METHODS) | set(_entry_points()))


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; ``a+b`` names a chain of registered methods (see chain.py)."""
    from wsss_domains.methods.chain import SEPARATOR, chain_class

    if SEPARATOR in name and name not in _METHODS:
        parts = [method_class(part.strip()) for part in name.split(SEPARATOR)]
        return chain_class(name, parts)
    if name not in _METHODS and name in _entry_points():
        return _load_entry_point(name)
    if name not in _METHODS:
        raise KeyError(f"unknown method '{name}'; available: {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, **options: Any) -> Method:
    """The method ``name`` built with ``options``; unknown or ill-typed options fail, naming the known ones."""
    cls = method_class(name)
    return cls(**cls.checked_options(options))


register_method(Method)
