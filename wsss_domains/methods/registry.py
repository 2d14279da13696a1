"""Name-based registry of WSSS methods (``wsss-domains methods``, ``--method NAME``)."""

from __future__ import annotations

from typing import Any

from wsss_domains.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under its ``name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method '{cls.name}' is already registered")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; ``a+b`` names a chain of registered methods (see chain.py)."""
    from wsss_domains.methods.chain import SEPARATOR, chain_class

    if SEPARATOR in name and name not in _METHODS:
        parts = [method_class(part.strip()) for part in name.split(SEPARATOR)]
        return chain_class(name, parts)
    if name not in _METHODS:
        raise KeyError(f"unknown method '{name}'; available: {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, **options: Any) -> Method:
    return method_class(name)(**options)


register_method(Method)
