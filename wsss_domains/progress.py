"""Whether long loops show progress bars: one switch for the whole process, not a parameter of every stage.

Bars are a display preference, like a log level. A command's ``--no-progress`` sets it once for
everything the command runs (``cli.main``); from Python, ``with progress_bars(False): ...`` does the
same for a block. Every loop over images or windows uses :func:`progress_bar`, and the Lightning
trainers read :func:`progress_shown`, so no function needs a ``progress`` argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from tqdm import tqdm

_T = TypeVar("_T")
_SHOWN: ContextVar[bool] = ContextVar("wsss_domains_progress_bars", default=True)


def progress_shown() -> bool:
    """Whether progress bars are on here (default: on)."""
    return _SHOWN.get()


@contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Progress bars on or off for the code run inside the block."""
    token = _SHOWN.set(bool(shown))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress_bar(iterable: Iterable[_T] | None = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, silent where bars are off; ``disable=True`` still silences one bar."""
    options["disable"] = bool(options.get("disable", False)) or not progress_shown()
    return tqdm(iterable, **options)
