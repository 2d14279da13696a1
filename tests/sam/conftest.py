"""A tiny randomly initialised SAM (segment_anything classes, small dims) that runs in milliseconds."""

from __future__ import annotations

import pytest
from sam_fixtures import build_tiny_sam

from wsss_domains.sam.registry import LoadedSam


@pytest.fixture
def tiny_sam() -> LoadedSam:
    return LoadedSam(model=build_tiny_sam(), name="tiny_test", checkpoint_id="random-init-seed0")
