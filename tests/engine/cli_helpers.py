"""Calling the command line in-process and checking its one-line errors, for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsss_domains.cli import EXIT_USAGE, main

ERROR = "wsss-domains: error: "


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``wsss-domains ARGS``."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2, one error line holding every fragment, no traceback."""
    assert code == EXIT_USAGE
    lines = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
