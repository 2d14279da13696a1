"""Shared fixtures. Nothing here downloads: hubs are forced offline before any import."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real development data beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sam_cache_per_test(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each test's SAM embeddings go to a folder of its own, never the user's cache: tiny random SAMs
    share a name and checkpoint id across tests, so a shared cache would hand one test another's."""
    from wsss_domains.sam.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("sam-embeddings")))


@pytest.fixture(autouse=True)
def _no_progress_bars() -> Iterator[None]:
    """Progress bars off in every test (the process-wide switch of wsss_domains.progress)."""
    from wsss_domains.progress import progress_bars

    with progress_bars(False):
        yield
