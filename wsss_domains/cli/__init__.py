"""The `wsss-domains` command line: a thin layer over :mod:`wsss_domains.pipeline`.

Subcommands are resolved lazily: ``wsss-domains --help`` and ``--version`` list them from the table
below without importing torch or any subcommand module; ``wsss-domains train ...`` imports only
the train command's module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from wsss_domains import __version__

EXIT_USAGE = 2


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, where there is one worth showing.

    Required options, flags that are off, empty lists and ``None`` have nothing to show, and an
    option whose help already says its default (``(default: the loader's)``) is not told twice.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        nothing = (
            action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        )
        if action.required or nothing or "(default" in text:  # `is`: 0 == False, and a default of 0 shows
            return text
        return super()._get_help_string(action)


# name -> (module, function that adds the full subcommand, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "domains": (
        "wsss_domains.cli.info",
        "add_domains_subcommand",
        "list installed domain plugins and their dataset loaders",
    ),
    "methods": ("wsss_domains.cli.info", "add_methods_subcommand", "list the WSSS methods of the registry"),
    "run": (
        "wsss_domains.cli.run",
        "add_run_subcommand",
        "the whole job: classifier, pseudo-labels, segmenter, label-free prediction, report",
    ),
    "train": (
        "wsss_domains.cli.train",
        "add_train_subcommand",
        "train a CAM classifier from image-level labels",
    ),
    "pseudo-labels": (
        "wsss_domains.cli.pseudo_labels",
        "add_pseudo_labels_subcommand",
        "write pseudo-labels for a split with a trained run",
    ),
    "segment": (
        "wsss_domains.cli.segment",
        "add_segment_subcommand",
        "train a segmentation network on pseudo-labels",
    ),
    "predict": (
        "wsss_domains.cli.predict",
        "add_predict_subcommand",
        "segment new images with a trained segmenter (no labels needed)",
    ),
    "evaluate": (
        "wsss_domains.cli.evaluate",
        "add_evaluate_subcommand",
        "score pseudo-labels or predictions against ground-truth masks",
    ),
    "new-domain": (
        "wsss_domains.scaffold.cli",
        "add_new_domain_subcommand",
        "write an installable domain-plugin package to start a new domain from",
    ),
    "bench": (
        "wsss_domains.transfer_matrix.cli",
        "add_bench_subcommand",
        "run the domain-transfer matrix: methods x domains, mIoU and gain over plain CAM",
    ),
    "prompts": (
        "wsss_domains.clip.cli",
        "add_prompts_subcommand",
        "CLIP prompts: learn per-domain prompts, list them",
    ),
}

# Commands that run long loops: each takes --no-progress, which turns every progress bar off.
WITH_PROGRESS_BARS = ("run", "train", "pseudo-labels", "segment", "predict", "evaluate")

EPILOG = (
    "Errors in your input (a missing or unreadable file, a bad option) end with one line naming the file or "
    "option and exit code 2; anything else is a bug and shows its traceback."
)


def command_help(name: str) -> str:
    """The one-line help of a subcommand (one source for the lazy listing and the full parser)."""
    return COMMANDS[name][2]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. With ``command``, only that subcommand is built in full (importing its module) and
    the others are listed by name; ``""`` builds none in full; None builds all of them."""
    parser = argparse.ArgumentParser(
        prog="wsss-domains",
        description=(
            "Weakly supervised semantic segmentation from image-level labels, across domains: train a CAM "
            "classifier, write pseudo-labels, train a segmenter on them, segment unlabelled images, evaluate "
            "every stage. Start with `wsss-domains run --domain histo` (a synthetic demo of the whole job), "
            "then `wsss-domains run` on your data."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    built: set[tuple[str, str]] = set()
    for name, (module, adder, text) in COMMANDS.items():
        if command is None or name == command:
            if (module, adder) not in built:
                getattr(importlib.import_module(module), adder)(sub)
                built.add((module, adder))
        else:
            sub.add_parser(name, help=text)
    for name, subparser in sub.choices.items():
        if command is None or name == command:
            subparser.add_argument(
                "--config",
                type=Path,
                metavar="FILE.yaml",
                help="options from a YAML file (option: value; options typed here win); "
                "the options a run used are saved as config.yaml in its folder",
            )
            if name in WITH_PROGRESS_BARS:
                subparser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommand parsers by name (argparse keeps them in a private action)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(sub.choices) if sub is not None else {}


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of :func:`build_parser`'s parser."""
    return _subcommands(parser)[name]


def _user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a problem with the user's input (one line, exit 2) rather than a bug."""
    from wsss_domains.data.io import DataError
    from wsss_domains.errors import UserError
    from wsss_domains.models.weights import WeightsNotFound

    # OSError: the filesystem refused (permission, a file where a folder must be, disk full); it names the path.
    return isinstance(exc, (UserError, DataError, WeightsNotFound, OSError, ValueError, KeyError))


def _parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser | None]:
    """The namespace, with a ``--config`` file's options placed before the typed ones, and the
    subcommand's parser (None for a command name argparse will reject)."""
    from wsss_domains.cli.config_file import config_tokens, split_config_argument

    argv, config = split_config_argument(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    if command not in COMMANDS:
        return parser.parse_args(argv), None
    subparser = subcommand_parser(parser, command)
    at = argv.index(command) + 1
    while (nested := _nested(subparser, argv[at:])) is not None:  # e.g. `prompts learn`
        subparser, at = nested, argv.index(nested.prog.split()[-1], at) + 1
    if config is not None:
        argv = [*argv[:at], *config_tokens(subparser, config), *argv[at:]]
    return parser.parse_args(argv), subparser


def _nested(parser: argparse.ArgumentParser, rest: list[str]) -> argparse.ArgumentParser | None:
    """The sub-subcommand parser named by the first positional token of ``rest``, if any."""
    name = next((a for a in rest if not a.startswith("-")), None)
    return _subcommands(parser).get(name) if name is not None else None


def _save_config(subparser: argparse.ArgumentParser | None, args: argparse.Namespace) -> None:
    """``config.yaml`` in the folder the command wrote (its ``--out``), for a rerun with ``--config``."""
    from wsss_domains.cli.config_file import save_effective_config

    out = getattr(args, "out", None)
    if subparser is not None and isinstance(out, Path) and out.is_dir():
        save_effective_config(subparser, args, out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, subparser = _parse(argv)
        from wsss_domains.progress import progress_bars

        with progress_bars(not getattr(args, "no_progress", False)):
            code = int(args.func(args) or 0)
        if code == 0:
            _save_config(subparser, args)
        return code
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not _user_error(exc):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"wsss-domains: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
