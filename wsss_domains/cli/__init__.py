"""The `wsss-domains` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wsss_domains import __version__

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from wsss_domains.bench.cli import add_bench_subcommand
    from wsss_domains.cli.evaluate import add_evaluate_subcommand
    from wsss_domains.cli.info import add_info_subcommands
    from wsss_domains.cli.predict import add_predict_subcommand
    from wsss_domains.cli.pseudo_labels import add_pseudo_labels_subcommand
    from wsss_domains.cli.run import add_run_subcommand
    from wsss_domains.cli.segment import add_segment_subcommand
    from wsss_domains.cli.train import add_train_subcommand
    from wsss_domains.clip.cli import add_prompts_subcommand
    from wsss_domains.scaffold.cli import add_new_domain_subcommand

    parser = argparse.ArgumentParser(
        prog="wsss-domains",
        description=(
            "Weakly supervised semantic segmentation from image-level labels, across domains: train a CAM "
            "classifier, write pseudo-labels, train a segmenter on them, segment unlabelled images, evaluate "
            "every stage. Start with `wsss-domains train --domain histo` (a synthetic demo of the whole job), "
            "then `wsss-domains run` on your data."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_info_subcommands(sub)
    add_train_subcommand(sub)
    add_pseudo_labels_subcommand(sub)
    add_evaluate_subcommand(sub)
    add_segment_subcommand(sub)
    add_predict_subcommand(sub)
    add_run_subcommand(sub)
    add_new_domain_subcommand(sub)
    add_bench_subcommand(sub)
    add_prompts_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from wsss_domains.data.io import DataError
    from wsss_domains.errors import UserError
    from wsss_domains.models.weights import WeightsNotFound

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, DataError, WeightsNotFound, FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"wsss-domains: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
