"""`wsss-domains domains` and `wsss-domains methods`: what is installed."""

from __future__ import annotations

import argparse
import textwrap

from wsss_domains.cli import command_help
from wsss_domains.domains import create_domain, list_domains
from wsss_domains.domains.registry import DOMAINS


def run_domains(args: argparse.Namespace) -> int:
    for name in list_domains():
        try:
            domain = create_domain(name)
        except Exception as exc:  # a broken third-party plugin must not hide the others
            print(f"{name}: failed to load ({type(exc).__name__}: {exc})")
            continue
        source = DOMAINS.source(name)
        print(f"{name}  ({source})")
        if domain.description:
            print(f"    {domain.description}")
        for spec in domain.datasets().values():
            ls = spec.label_space
            print(
                f"    --dataset {spec.name:<14} splits: {', '.join(spec.splits)}; "
                f"{ls.num_classes} classes ({', '.join(ls.classes)}); background: {ls.background_mode.value}"
            )
        for option in type(domain).option_specs().values():
            print(f"    --domain-option {option.describe()}")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from wsss_domains.methods import list_methods, method_class  # every method module: only here
    from wsss_domains.methods.registry import METHODS
    from wsss_domains.registry import BUILT_IN

    def origin(name: str) -> str:
        """Where an installed method comes from (its entry point); nothing for the built-in ones."""
        source = METHODS.source(name)
        return "" if source == BUILT_IN else f" [{source}]"

    for name in list_methods():
        try:
            cls = method_class(name)
        except Exception as exc:  # a broken third-party method must not hide the others
            print(f"{name:<18} failed to load ({type(exc).__name__}: {exc}){origin(name)}")
            continue
        if not args.details:
            print(f"{name:<18} {cls.description}{origin(name)}")
        else:
            print(name + origin(name))
            print(textwrap.indent(textwrap.fill(cls.description, 96), "    "))
            if cls.deviations:
                print(
                    textwrap.indent(
                        textwrap.fill(f"differs from its reference: {cls.deviations}", 96), "    "
                    )
                )
            specs = [spec for spec in cls.option_specs().values() if spec.name != "sam"]
            print("    options:" + ("" if specs else " none"))
            for spec in specs:
                print(f"      {spec.describe()}")
            print()
    print(
        "Chain post-hoc refinements with '+', e.g. --method cam-proto+random-walk (options: PART.KEY=VALUE)."
        + ("" if args.details else " Options and deviations: wsss-domains methods --details")
    )
    from wsss_domains.segmentation.model import TRAINING_METHODS

    print("\nSegmenter training (segment/run --seg-training):")
    for name, description in TRAINING_METHODS.items():
        print(f"{name:<18} {description}")
    return 0


def add_domains_subcommand(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("domains", help=command_help("domains")).set_defaults(func=run_domains)


def add_methods_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help=command_help("methods"))
    p.add_argument(
        "--details",
        action="store_true",
        help="each method's options (type, default) and where it differs from its paper",
    )
    p.set_defaults(func=run_methods)
