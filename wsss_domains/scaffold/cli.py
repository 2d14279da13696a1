"""``wsss-domains new-domain NAME [--dest DIR]``: the subcommand the main CLI mounts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsss_domains.cli import command_help
from wsss_domains.scaffold.scaffold import plugin_names, scaffold_domain


def run_new_domain(args: argparse.Namespace) -> int:
    """Scaffold the package and say how to install and test it; exit status 2 on bad input."""
    try:
        project = scaffold_domain(args.name, args.dest)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = plugin_names(args.name)
    print(f"wrote {project}")
    print(f"  install:   pip install -e {project}")
    print(f"  test:      pytest {project / 'tests'}")
    print(f"  demo data: python -c \"from {names.package}.demo import write_demo; write_demo('demo-data')\"")
    return 0


def add_new_domain_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``new-domain`` to an ``add_subparsers()`` object; the handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "new-domain",
        help=command_help("new-domain"),
        description="Write an installable plugin package (pyproject entry point, plugin class, loader,"
        " metrics hook, prompts JSON, demo data generator, tests) for a new domain.",
    )
    parser.add_argument("name", metavar="NAME", help="domain name, e.g. street-lidar")
    parser.add_argument(
        "--dest", type=Path, default=Path("."), help="folder to write the package folder into (default: .)"
    )
    parser.set_defaults(func=run_new_domain)
    return parser
