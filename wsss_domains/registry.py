"""One registry style for everything a third party may add: domains, methods, refiners, SAM models, weights.

Each kind of extension has one :class:`Registry`: the project's own entries are registered in code
(a decorator or a call, as timm registers its models), and an installed package adds its own under
the kind's entry-point group in its ``pyproject.toml``; such an entry is loaded (imported) only when
first named, so listing names imports nothing. Each kind's module exposes ``list_*`` and
``create_*`` functions over its registry; the registry itself holds only the lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

T = TypeVar("T")

BUILT_IN = "built in"
RUNTIME = "registered at run time"


@cache
def _group(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


class Registry(Generic[T]):
    """Names of one kind of extension mapped to what builds them.

    ``check(name, loaded)`` validates what an entry point loads (its type, that its name agrees)
    and returns it; a broken installed package fails when its entry is named, not at start-up.
    """

    def __init__(
        self,
        kind: str,
        group: str,
        check: Callable[[str, object], T] | None = None,
        builtins: Callable[[], object] | None = None,
    ) -> None:
        self.kind = kind  # in messages: "unknown {kind} 'x'"
        self.group = group  # the entry-point group third-party packages declare
        self._check = check
        # Imports the modules whose decorators register the project's own entries; run once, at the
        # first lookup, so importing the kind's package stays cheap.
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._sources: dict[str, str] = {}
        self._lazy: dict[str, EntryPoint] = {}  # the project's own entries that import an optional package

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, {len(self.names())} names)"

    def entry_points(self) -> dict[str, EntryPoint]:
        """The installed packages' entries of this kind (read once per process; see :meth:`refresh`)."""
        return _group(self.group)

    def refresh(self) -> None:
        """Forget the entry points read and loaded so far: a package (un)installed meanwhile is seen."""
        _group.cache_clear()
        for name in [name for name, source in self._sources.items() if source not in (BUILT_IN, RUNTIME)]:
            self.unregister(name)

    def register(self, name: str, entry: T, *, source: str = BUILT_IN, replace: bool = False) -> T:
        """Add ``entry`` under ``name``; registering a different entry under a taken name fails."""
        if not replace and name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} '{name}' is already registered ({self._sources[name]})")
        self._entries[name] = entry
        self._sources[name] = source
        return entry

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            load, self._builtins = self._builtins, None
            load()

    def register_lazy(self, name: str, target: str) -> None:
        """Add ``name`` as ``"module:attribute"``, imported when first named (an optional dependency)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered ({self._sources[name]})")
        self._lazy[name] = EntryPoint(name, target, self.group)

    def unregister(self, name: str) -> None:
        """Remove a name registered in code (entry points stay: uninstall their package)."""
        self._entries.pop(name, None)
        self._sources.pop(name, None)
        self._lazy.pop(name, None)

    @contextmanager
    def registered(self, name: str, entry: T) -> Iterator[T]:
        """``entry`` registered under ``name`` inside the block only (tests, notebooks)."""
        previous = (self._entries.get(name), self._sources.get(name))
        self.register(name, entry, source=RUNTIME, replace=True)
        try:
            yield entry
        finally:
            self.unregister(name)
            if previous[0] is not None:
                self.register(name, previous[0], source=previous[1] or BUILT_IN)

    def names(self) -> list[str]:
        """Every registered and installed name, sorted; no installed package is imported to list them."""
        self._load_builtins()
        return sorted(set(self._entries) | set(self._lazy) | set(self.entry_points()))

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries or name in self._lazy or name in self.entry_points()

    def source(self, name: str) -> str:
        """Where ``name`` comes from: ``module:attribute`` of its entry point, or how it was registered."""
        self._load_builtins()
        if name in self._entries:
            return self._sources[name]
        if name in self._lazy:
            return BUILT_IN
        if name in self.entry_points():
            return self.entry_points()[name].value
        raise self.unknown(name)

    def get(self, name: str) -> T:
        """The entry of ``name``; an installed one is loaded and checked the first time it is named."""
        self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            entry = self._checked(name, self._lazy.pop(name).load())
            return self.register(name, entry)
        point = self.entry_points().get(name)
        if point is None:
            raise self.unknown(name)
        return self.register(name, self._checked(name, point.load()), source=point.value)

    def _checked(self, name: str, loaded: object) -> T:
        return self._check(name, loaded) if self._check is not None else loaded  # type: ignore[return-value]

    def unknown(self, name: str, hint: str = "") -> KeyError:
        """The error for a name nobody registered, listing the known ones."""
        known = ", ".join(self.names()) or "none"
        return KeyError(f"unknown {self.kind} '{name}'{hint}; available: {known}")
