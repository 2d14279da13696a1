"""Argument groups every subcommand shares (data, tiles, methods, domain options); the API does the work.

``open_dataset``, ``resolve_device`` and friends live in :mod:`wsss_domains.pipeline.data` and are
re-exported here for the subcommands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsss_domains.errors import UserError
from wsss_domains.pipeline.data import (  # noqa: F401  (re-exported for the subcommands)
    OpenedData,
    open_dataset,
    resolve_device,
    tile_options,
    validate_dataset,
)

# The API's user error under the name the command line has always used.
CliError = UserError


def add_data_arguments(
    parser: argparse.ArgumentParser,
    data_required: bool = True,
    data_group: argparse._MutuallyExclusiveGroup | None = None,
) -> None:
    """--dataset, --data, --split; ``data_group`` holds --data when another input may replace it."""
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="loader name (see `wsss-domains domains`); recognised from --data if omitted",
    )
    (data_group or parser).add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        required=data_required and data_group is None,
        help="dataset folder",
    )
    parser.add_argument(
        "--split",
        metavar="S",
        help="split name as the dataset spells it (default: the loader's), optionally sliced or folded"
        " ('train[0:6]', 'validation[fold=2/4]') or joined ('validation + training')",
    )


def add_tiles_argument(parser: argparse.ArgumentParser) -> None:
    """``--tiles N`` of pseudo-labels and evaluate: score tiles of a split instead of whole images."""
    parser.add_argument(
        "--tiles",
        type=int,
        metavar="N",
        help="cut each image into N x N tiles, each with its own image-level labels from its mask (the "
        "remote-sensing protocol `bench` uses); give the same N to pseudo-labels and evaluate",
    )


def add_method_arguments(
    parser: argparse.ArgumentParser, default: str | None, default_help: str = "the run's"
) -> None:
    """--method and the options methods take (stored in the run, overridable at pseudo-label time)."""
    parser.add_argument(
        "--method",
        default=default,
        help="WSSS method (see `wsss-domains methods`)" + ("" if default else f"; default: {default_help}"),
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (values parsed as JSON when possible), e.g. num_iter=20",
    )
    parser.add_argument(
        "--sam-checkpoint", type=Path, help="SAM checkpoint for SAM-based methods (sepl, s2c, sam-proto)"
    )
    parser.add_argument("--clip-model", help="open_clip architecture for CLIP-based methods, e.g. ViT-B-16")
    parser.add_argument("--clip-weights", type=Path, help="local open_clip checkpoint for CLIP-based methods")


def key_values(items: list[str], flag: str) -> dict[str, object]:
    """``KEY=VALUE`` items as a dict, values JSON-decoded where they parse (``0.7``, ``true``, ``[1,2]``)
    and kept as text otherwise (``macenko``); the API checks names and types."""
    import json

    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} expects KEY=VALUE, got '{item}'")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def add_domain_option_argument(parser: argparse.ArgumentParser, recorded: bool = True) -> None:
    """``--domain-option KEY=VALUE`` of the commands that build the domain themselves; ``recorded``
    for those that start a run (train, run), whose later stages reuse what the run recorded."""
    after = (
        "Recorded in the run, so pseudo-labels, segment and predict prepare images the same way"
        if recorded
        else "Give the options the run was trained with"
    )
    parser.add_argument(
        "--domain-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the domain plugin, repeatable (values parsed as JSON when possible), e.g. "
        f"stain=macenko for histo (Macenko stain normalisation of every image). {after}; each domain's "
        "options: `wsss-domains domains`",
    )


def domain_options(args: argparse.Namespace) -> dict[str, object]:
    """Options from --domain-option KEY=VALUE (checked against the plugin by the API)."""
    return key_values(getattr(args, "domain_option", []), "--domain-option")


def method_options(args: argparse.Namespace) -> dict[str, object]:
    """Options from --method-option KEY=VALUE plus the dedicated SAM / CLIP flags."""
    options = key_values(args.method_option, "--method-option")
    for flag in ("sam_checkpoint", "clip_model", "clip_weights"):
        value = getattr(args, flag, None)
        if value is not None:
            options[flag] = str(value)
    return options
