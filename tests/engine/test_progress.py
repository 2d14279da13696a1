"""Progress bars: one process-wide switch, set by every long command's --no-progress."""

from __future__ import annotations

import argparse

from wsss_domains import cli
from wsss_domains.cli import evaluate as evaluate_command
from wsss_domains.progress import progress_bar, progress_bars, progress_shown


def test_the_switch_holds_inside_its_block_and_is_restored_after():
    with progress_bars(True):
        assert progress_shown()
        with progress_bars(False):
            assert not progress_shown()
            assert progress_bar(range(3)).disable
        assert progress_shown()
        assert not progress_bar(range(3)).disable
        assert progress_bar(range(3), disable=True).disable  # one bar may still be silenced


def test_no_progress_turns_the_bars_off_for_everything_the_command_runs(monkeypatch):
    seen: list[bool] = []

    def spy(args: argparse.Namespace) -> int:
        seen.append(progress_shown())
        return 0

    monkeypatch.setattr(evaluate_command, "run_evaluate", spy)
    argv = ["evaluate", "--domain", "histo", "--data", "x", "--pred", "p"]
    with progress_bars(False):  # the test suite's own setting must not decide
        assert cli.main(argv) == 0
    assert cli.main([*argv, "--no-progress"]) == 0
    assert seen == [True, False]


def test_only_commands_with_long_loops_take_no_progress():
    parser = cli.build_parser()
    for name in cli.WITH_PROGRESS_BARS:
        assert "--no-progress" in cli.subcommand_parser(parser, name).format_help()
    assert "--no-progress" not in cli.subcommand_parser(parser, "domains").format_help()
