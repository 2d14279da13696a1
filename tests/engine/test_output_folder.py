"""Output folders: killed writers' temporary files are cleaned, failed jobs leave no empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsss_domains.data.io import STALE_PART_SECONDS, atomic_write, output_folder, remove_stale_parts


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_stale_temporary_files_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / "sub" / f".a.pid{dead}.x1y2.png.part"
    young = tmp_path / f".b.pid{dead}.x1y2.png.part"
    alive = tmp_path / f".c.pid{os.getpid()}.x1y2.png.part"
    raster_partial = tmp_path / ".scene.tif.part"  # a resumable raster's own partial output
    result = tmp_path / "a.png"
    for path in (stale, young, alive, raster_partial, result):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for path in (stale, alive, raster_partial, result):
        _age(path, STALE_PART_SECONDS + 60)
    assert remove_stale_parts(tmp_path) == 1
    assert not stale.exists()
    assert young.exists() and alive.exists() and raster_partial.exists() and result.exists()


def test_atomic_write_names_its_temporary_file_after_the_writer(tmp_path):
    seen: list[str] = []

    def write(tmp: Path) -> None:
        seen.append(tmp.name)
        tmp.write_text("done")

    atomic_write(tmp_path / "out.json", write)
    assert seen[0].startswith(f".out.pid{os.getpid()}.") and seen[0].endswith(".json.part")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_job_failing_before_it_writes_leaves_no_folder_it_created(tmp_path):
    with pytest.raises(ValueError), output_folder(tmp_path / "new" / "out"):
        raise ValueError("the split holds no images")
    assert not (tmp_path / "new" / "out").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(ValueError), output_folder(existing):
        raise ValueError("boom")
    assert existing.is_dir()  # the user's own folder stays
    with pytest.raises(ValueError), output_folder(tmp_path / "partial") as out:
        (out / "one.png").write_bytes(b"x")
        raise ValueError("killed half way")
    assert (tmp_path / "partial" / "one.png").is_file()  # what was written stays, for the resume
