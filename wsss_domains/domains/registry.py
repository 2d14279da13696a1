"""Discovery of domain plugins through the ``wsss_domains.domains`` entry-point group."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from wsss_domains.domains.contract import DomainPlugin, LabelSpace

ENTRY_POINT_GROUP = "wsss_domains.domains"

# Plugins registered at run time (tests, notebooks); entry points remain the normal route.
_RUNTIME: dict[str, type[DomainPlugin]] = {}


def register_domain(plugin: type[DomainPlugin]) -> type[DomainPlugin]:
    """Register a plugin class without packaging it (usable as a decorator)."""
    _RUNTIME[plugin.name] = plugin
    return plugin


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_domains() -> list[str]:
    """Names of every installed or registered domain, sorted."""
    return sorted(set(_entry_points()) | set(_RUNTIME))


def domain_class(name: str) -> type[DomainPlugin]:
    """The plugin class registered under ``name`` (not instantiated: its options can be read first)."""
    if name in _RUNTIME:
        return _RUNTIME[name]
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(list_domains()) or "none"
        raise KeyError(f"unknown domain '{name}'; installed domains: {known}")
    cls = eps[name].load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, DomainPlugin)):
        raise TypeError(f"entry point '{name}' does not point to a DomainPlugin subclass: {cls!r}")
    if getattr(cls, "name", None) != name:
        raise TypeError(f"entry point '{name}' loads a plugin named {getattr(cls, 'name', None)!r}")
    return cls


def check_domain_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` of domain ``name`` converted to their declared types, as runs record them.

    An unknown option or a value of the wrong type is one :class:`OptionError` naming the option
    and the options the domain takes, raised before any work starts.
    """
    return domain_class(name).checked_options(options or {})


def get_domain(name: str, **options: Any) -> DomainPlugin:
    """Instantiate the plugin registered under ``name`` with its (checked) ``options``."""
    cls = domain_class(name)
    return cls(**cls.checked_options(options))


def recorded_label_space(
    domain_name: str,
    dataset: str,
    data: str | None,
    what: str = "the run",
    domain_options: Mapping[str, Any] | None = None,
) -> tuple[DomainPlugin, LabelSpace]:
    """The domain and label space a saved model (a run, a segmenter) recorded, without its data set.

    The domain is rebuilt with the options the model recorded (``domain_options``), so its
    preprocessing matches training. The classes come from the domain's loader ``dataset``; one that
    declares its classes in its data folder still needs that folder (``data``). Callers check the
    classes the model recorded.
    """
    from pathlib import Path

    domain = get_domain(domain_name, **(domain_options or {}))
    spec = domain.dataset(dataset)
    if spec.label_space_from is None:
        return domain, spec.label_space
    if data is None or not Path(data).exists():
        raise FileNotFoundError(
            f"dataset '{spec.name}' declares its classes in its data folder, and {what}'s data folder "
            f"{data} is not there"
        )
    return domain, spec.label_space_for(Path(data))
