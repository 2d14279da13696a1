"""The domain registry: plugins installed through the ``wsss_domains.domains`` entry-point group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.registry import RUNTIME, Registry

ENTRY_POINT_GROUP = "wsss_domains.domains"


def _checked_plugin(name: str, loaded: object) -> type[DomainPlugin]:
    if not (isinstance(loaded, type) and issubclass(loaded, DomainPlugin)):
        raise TypeError(f"entry point '{name}' does not point to a DomainPlugin subclass: {loaded!r}")
    if getattr(loaded, "name", None) != name:
        raise TypeError(f"entry point '{name}' loads a plugin named {getattr(loaded, 'name', None)!r}")
    return loaded


DOMAINS: Registry[type[DomainPlugin]] = Registry("domain", ENTRY_POINT_GROUP, _checked_plugin)


def register_domain(plugin: type[DomainPlugin]) -> type[DomainPlugin]:
    """Register a plugin class without packaging it (tests, notebooks; usable as a decorator).

    Entry points remain the normal route; registering again under the same name replaces.
    """
    return DOMAINS.register(plugin.name, plugin, source=RUNTIME, replace=True)


def list_domains() -> list[str]:
    """Names of every installed or registered domain, sorted."""
    return DOMAINS.names()


def domain_class(name: str) -> type[DomainPlugin]:
    """The plugin class registered under ``name`` (not instantiated: its options can be read first)."""
    return DOMAINS.get(name)


def check_domain_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` of domain ``name`` converted to their declared types, as runs record them.

    An unknown option or a value of the wrong type is one :class:`OptionError` naming the option
    and the options the domain takes, raised before any work starts.
    """
    return domain_class(name).checked_options(options or {})


def create_domain(name: str, **options: Any) -> DomainPlugin:
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

    domain = create_domain(domain_name, **(domain_options or {}))
    spec = domain.dataset(dataset)
    if spec.label_space_from is None:
        return domain, spec.label_space
    if data is None or not Path(data).exists():
        raise FileNotFoundError(
            f"dataset '{spec.name}' declares its classes in its data folder, and {what}'s data folder "
            f"{data} is not there"
        )
    return domain, spec.label_space_for(Path(data))
