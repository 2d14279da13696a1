"""The method registry (``wsss-domains methods``, ``--method NAME``).

Built-in methods register with :func:`register_method` when their module is imported, which the
registry does at its first lookup (importing ``wsss_domains.methods`` stays cheap). A
third-party package adds its own through the ``wsss_domains.methods`` entry-point group, as domain
plugins do (``my-method = "my_package.methods:MyMethod"``); it is loaded when first named.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsss_domains.methods.base import Method
from wsss_domains.registry import Registry

ENTRY_POINT_GROUP = "wsss_domains.methods"


def _checked_method(name: str, loaded: object) -> type[Method]:
    """The class an installed package registers as method ``name``, checked before it is used."""
    if not (isinstance(loaded, type) and issubclass(loaded, Method)):
        raise TypeError(f"entry point '{name}' ({loaded!r}) is not a Method subclass")
    if loaded.name != name:
        raise ValueError(f"entry point '{name}' loads a method named '{loaded.name}'; the names must agree")
    return loaded


# The modules of the built-in methods; each registers its methods with @register_method on import.
BUILT_IN_MODULES = (
    "cam_fusion",
    "cam_proto",
    "clims",
    "clip_methods",
    "cpn",
    "cross_arch",
    "dupl",
    "fma",
    "label_probe",
    "lpcam",
    "more",
    "pbip",
    "pole",
    "pot",
    "ppc",
    "psdpm",
    "rca",
    "refinement",
    "s2c",
    "semples",
    "sam_probe",
    "sam_proto",
    "seam",
    "seed_probe",
    "sepl",
    "sipe",
    "toco",
    "weclip",
)


def _import_built_in_methods() -> None:
    for module in BUILT_IN_MODULES:
        importlib.import_module(f"wsss_domains.methods.{module}")


METHODS: Registry[type[Method]] = Registry(
    "method", ENTRY_POINT_GROUP, _checked_method, builtins=_import_built_in_methods
)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under its ``name``."""
    return METHODS.register(cls.name, cls)


def list_methods() -> list[str]:
    """Built-in and installed method names (installed ones are not imported to be listed)."""
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; ``a+b`` names a chain of registered methods (see chain.py)."""
    from wsss_domains.methods.chain import SEPARATOR, chain_class

    if SEPARATOR in name and name not in METHODS:
        parts = [method_class(part.strip()) for part in name.split(SEPARATOR)]
        return chain_class(name, parts)
    return METHODS.get(name)


def create_method(name: str, **options: Any) -> Method:
    """The method ``name`` built with ``options``; unknown or ill-typed options fail, naming the known ones."""
    cls = method_class(name)
    return cls(**cls.checked_options(options))


register_method(Method)
