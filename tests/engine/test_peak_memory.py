"""Peak memory of one block inside a long-lived process: the high-water mark is reset per block."""

from __future__ import annotations

import numpy as np
import pytest

from wsss_domains import peak_memory as pm
from wsss_domains.peak_memory import larger, peak_memory

MB = 1_000_000

needs_proc = pytest.mark.skipif(
    not pm.CLEAR_REFS.exists() or not pm.STATUS.exists(), reason="needs Linux /proc/self/clear_refs"
)


def _resident_now() -> int:
    for line in pm.STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@needs_proc
def test_each_block_reports_its_own_peak_not_the_process_peak():
    with peak_memory() as big:
        block = np.ones(400 * MB // 8)  # 400 MB touched, then freed
        block.sum()
        del block
    with peak_memory() as small:
        block = np.ones(40 * MB // 8)
        block.sum()
        del block
    assert big.rss_bytes is not None and small.rss_bytes is not None
    baseline = _resident_now()
    assert big.rss_bytes >= baseline + 350 * MB
    # Without the reset, the second block would report the first block's 400 MB peak.
    assert small.rss_bytes < baseline + 150 * MB
    assert big.gpu_bytes is None and small.gpu_bytes is None  # no GPU asked for


def test_unmeasurable_platform_gives_unknown_not_a_lifetime_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    with peak_memory() as peak:
        pass
    assert peak.rss_bytes is None


def test_peak_is_filled_when_the_block_raises():
    with pytest.raises(RuntimeError), peak_memory() as peak:
        raise RuntimeError("boom")
    if pm.CLEAR_REFS.exists():
        assert peak.rss_bytes is not None and peak.rss_bytes > 0


def test_larger_is_unknown_when_either_stage_is():
    assert larger(3, 5) == 5 and larger(7, 2) == 7
    assert larger(None, 5) is None and larger(4, None) is None
