"""The command line answers --help, --version and `domains` without importing torch or any subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wsss_domains.cli import COMMANDS, build_parser

PROBE = """
import sys
from wsss_domains.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "lightning", "timm", "rasterio", "open_clip", "segment_anything",
                           "wsss_domains.cli.train", "wsss_domains.cli.run") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_import_nothing_heavy(argv: list[str]):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY \n" in out or out.rstrip().endswith("HEAVY"), out
    if argv == ["--help"]:
        for name in COMMANDS:
            assert name in out  # every subcommand listed, with its help
        assert "exit code 2" in out  # the epilogue says how errors are reported


def test_listing_domains_imports_nothing_heavy():
    """Every built-in plugin is built and its loaders listed, yet no torch: loaders import it when they read."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=["domains"])], capture_output=True, text=True, check=True
    ).stdout
    assert out.rstrip().endswith("HEAVY"), out
    for listed in (
        "histo  (",
        "--dataset wsss4luad",
        "--dataset deepglobe",
        "--dataset camvid",
        "--dataset voc2012",
    ):
        assert listed in out
    assert "failed to load" not in out


def test_one_subcommand_builds_only_its_own_parser():
    parser = build_parser("evaluate")
    args = parser.parse_args(["evaluate", "--domain", "d", "--data", "x", "--pred", "p"])
    assert args.func.__name__ == "run_evaluate"
    with pytest.raises(SystemExit):  # the others are names and help only: they take no options
        parser.parse_args(["train", "--domain", "d"])
    full = build_parser()  # everything, as the tests of each subcommand use it
    assert full.parse_args(["train", "--domain", "d"]).func.__name__ == "run_train"
