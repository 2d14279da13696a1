"""`wsss-domains bench`: the domain-transfer matrix (methods x domains) from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from wsss_domains.cli import DefaultsHelpFormatter, command_help
from wsss_domains.cli.common import CliError, resolve_device
from wsss_domains.domains import domain_class
from wsss_domains.methods import list_methods, method_class
from wsss_domains.transfer_matrix.matrix import (
    MatrixSettings,
    ordered_methods,
    run_matrix,
    trains_own_model,
)
from wsss_domains.transfer_matrix.presets import DEFAULT_PRESETS, CellPreset, load_presets
from wsss_domains.transfer_matrix.replicates import aggregate, expand, fold_pool
from wsss_domains.transfer_matrix.report import BASELINE, build_matrix, machine_info, write_outputs

DEFAULT_OUT = Path("runs") / "bench"
MODEL_FLAGS = ("sam_checkpoint", "clip_model", "clip_weights")

# Names --methods expands to every registered method of a kind (a method of the same name wins).
METHOD_GROUPS = {
    "training-time": "every method that trains its own classifier (SEAM, PPC, ...)",
    "post-hoc": "every method that acts on the plain-CAM run at pseudo-label time",
    "all": "every registered method",
}


def default_data_root() -> Path:
    """``../shared/data`` beside the checkout (an editable install), else beside the working folder."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo.parent / "shared" / "data"
    return Path("..") / "shared" / "data"


def add_bench_subcommand(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help=command_help("bench"),
        description=(
            "For every (domain, method) cell: train within the budget (post-hoc methods reuse the domain's "
            "plain-CAM run), pseudo-label the domain's scoring split (a hold-out of its development data), "
            "evaluate; each cell records its wall time and the peak memory of its training and of its "
            "pseudo-labelling. Writes cells/<domain>__<method>.json as each cell finishes, then matrix.md, "
            "matrix.json, heatmap.png and the self-contained matrix.html. Re-running with the same --out skips finished cells and resumes "
            "unfinished training from its checkpoint. A failing cell is recorded and the matrix goes on. "
            f"Built-in domain presets: {', '.join(DEFAULT_PRESETS)} (--presets FILE.yaml for your own)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--methods",
        required=True,
        help="comma-separated methods, or a group expanding to the registry's methods of that kind: "
        + "; ".join(f"{name}: {what}" for name, what in METHOD_GROUPS.items())
        + ". cam is always run as the baseline",
    )
    p.add_argument(
        "--domains", required=True, help=f"comma-separated domain presets ({', '.join(DEFAULT_PRESETS)})"
    )
    p.add_argument("--budget-minutes", type=float, default=3.0, help="training budget per training run")
    p.add_argument(
        "--folds",
        type=int,
        default=1,
        metavar="K",
        help="score every cell by K-fold cross-validation over the column's images (the split both its "
        "slices come from; a column with separate train and score splits keeps them), pooled per seed",
    )
    p.add_argument(
        "--stratified",
        action="store_true",
        help="with --folds: folds balanced by class (each class's images spread over the folds) instead "
        "of interleaved by sorted id; for a few large images where a class lives in one or two",
    )
    p.add_argument(
        "--seeds",
        default="0",
        metavar="0,1",
        help="training seeds; with several, each cell shows the mean and spread over seeds",
    )
    p.add_argument(
        "--random-patches",
        type=int,
        metavar="K",
        help="train every mask-labelled domain on K random windows per image and epoch instead of its grid",
    )
    p.add_argument(
        "--presets",
        type=Path,
        metavar="FILE.yaml",
        help="domain presets of your own (the keys of the built-in presets.yaml; default: the built-in ones)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="matrix folder (resumable)")
    p.add_argument("--data-root", type=Path, default=default_data_root(), help="development data root")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="a method option, repeatable (JSON values when possible); METHOD. scopes it to one method, "
        "unscoped it goes to every method that takes it (see `wsss-domains methods --details`)",
    )
    p.add_argument(
        "--domain-option",
        action="append",
        default=[],
        metavar="[DOMAIN.]KEY=VALUE",
        help="an option of a column's domain plugin, repeatable, scoped as --method-option: DOMAIN. (a "
        "column of --domains) scopes it to one column, unscoped it goes to every column whose domain takes "
        "it; e.g. histo.stain=macenko (see `wsss-domains domains`)",
    )
    p.add_argument(
        "--accumulate-batches",
        action="append",
        default=[],
        metavar="[METHOD=]N",
        help="train with each column's batch split into N micro-batches and their gradients summed, one "
        "optimiser step per batch as before (less memory: for a method that does not fit at the column's "
        "batch), repeatable; METHOD= scopes it to one training method (its cells then differ from the "
        "others only in batch-norm statistics over the smaller micro-batch), unscoped to every one",
    )
    p.add_argument("--sam-checkpoint", type=Path, help="SAM checkpoint for SAM-based methods")
    p.add_argument("--clip-model", help="open_clip architecture for CLIP-based methods")
    p.add_argument("--clip-weights", type=Path, help="local open_clip checkpoint for CLIP-based methods")
    p.add_argument("--retry-failed", action="store_true", help="recompute cells that failed before")
    p.add_argument("--progress", action="store_true", help="progress bars for each step")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run training and pseudo-labelling in the bench process itself (for a debugger); by "
        "default each runs in a child process, so a cell killed for want of memory fails alone "
        "instead of ending the matrix",
    )
    p.set_defaults(func=run_bench)
    return p


def parse_seeds(text: str) -> list[int]:
    """``0,1`` -> ``[0, 1]``, in order, once each."""
    try:
        seeds = list(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError as exc:
        raise CliError(f"--seeds must be comma-separated integers, got '{text}'") from exc
    if not seeds:
        raise CliError("--seeds names no seed")
    return seeds


def expand_method_groups(text: str, known: Sequence[str]) -> str:
    """``--methods`` with each group name (:data:`METHOD_GROUPS`) replaced by its methods, in registry order."""

    def members(group: str) -> list[str]:
        if group == "all":
            return list(known)
        return [m for m in known if trains_own_model(m) == (group == "training-time")]

    parts = [n.strip() for n in text.split(",")]
    return ",".join(",".join(members(n)) if n in METHOD_GROUPS and n not in known else n for n in parts if n)


def parse_names(text: str, known: Sequence[str], what: str, chains: bool = False) -> list[str]:
    """Comma-separated names, in order, once each; unknown ones are a usage error listing the known.

    With ``chains``, ``a+b`` names whose parts are all known are accepted too (method chains).
    """
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise CliError(f"no {what} given; known: {', '.join(known)}")

    def is_known(name: str) -> bool:
        if chains and "+" in name:
            return all(part.strip() in known for part in name.split("+"))
        return name in known

    unknown = [n for n in names if not is_known(n)]
    if unknown:
        raise CliError(f"unknown {what}(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return names


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def scoped_options(
    flag: str, items: Sequence[str], takes: Mapping[str, Collection[str]], scope: str
) -> dict[str, dict[str, object]]:
    """``SCOPE.KEY=VALUE`` items for one scope; an unscoped ``KEY=VALUE`` for every scope that takes ``KEY``.

    The one option syntax of ``bench``: ``takes`` maps each scope (a method, a domain column) to
    the option names it takes; an unscoped option that none takes fails, naming it.
    """
    options: dict[str, dict[str, object]] = {name: {} for name in takes}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} expects [{scope}.]KEY=VALUE, got '{item}'")
        if ":" in key:
            raise CliError(f"{flag} '{item}': scope options with a dot, {scope}.KEY=VALUE")
        prefix, dot, name = key.partition(".")
        if dot:
            if prefix not in options:
                raise CliError(f"{flag} '{item}': '{prefix}' is not in this matrix ({', '.join(takes)})")
            targets = [prefix]
        else:
            name = key
            targets = [target for target, names in takes.items() if name in names]
            if not targets:
                raise CliError(f"{flag} '{item}': no {scope.lower()} of this matrix takes option '{name}'")
        for target in targets:
            options[target][name] = _value(value)
    return options


def scoped_method_options(
    methods: Sequence[str], items: Sequence[str], flags: Mapping[str, object | None]
) -> dict[str, dict[str, object]]:
    """Options per method, checked against each method's own options before any cell runs.

    ``METHOD.KEY=VALUE`` goes to one method of the matrix (for a chain, ``METHOD.PART.KEY``), as
    ``PART.KEY`` does inside a chain; an unscoped ``KEY=VALUE`` goes to every method that takes
    ``KEY``. Model flags (``--sam-checkpoint``, ``--clip-*``) go to the methods that take them.
    """
    specs = {m: method_class(m).option_specs() for m in methods}
    options = scoped_options("--method-option", items, specs, "METHOD")
    for flag, value in flags.items():
        if value is not None:
            for method in methods:
                if flag in specs[method]:
                    options[method][flag] = str(value)
    for method, given in options.items():
        method_class(method).checked_options(given)  # a misspelt or ill-typed option fails now, not hours in
    return {m: o for m, o in options.items() if o}


def accumulation_by_method(
    methods: Sequence[str], items: Sequence[str], presets: Mapping[str, CellPreset], columns: Sequence[str]
) -> dict[str, int]:
    """``--accumulate-batches`` items (``[METHOD=]N``) as N by training method, checked against every
    column's batch size before any cell runs."""
    training = [m for m in methods if trains_own_model(m)] + [BASELINE]
    accumulation: dict[str, int] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise CliError(f"--accumulate-batches expects [METHOD=]N with N >= 1, got '{item}'")
        if sep and name not in methods:
            raise CliError(
                f"--accumulate-batches '{item}': '{name}' is not in this matrix ({', '.join(methods)})"
            )
        if sep and name not in training:
            raise CliError(
                f"--accumulate-batches '{item}': {name} trains no classifier of its own (it reads the {BASELINE} run)"
            )
        for method in [name] if sep else training:
            accumulation[method] = n
    for method, n in accumulation.items():
        for column in columns:
            if presets[column].batch_size % n:
                raise CliError(
                    f"--accumulate-batches {method}={n} must divide the batch size of column '{column}' "
                    f"({presets[column].batch_size})"
                )
    return {m: n for m, n in accumulation.items() if n > 1}


def scoped_domain_options(
    columns: Sequence[str], presets: Mapping[str, CellPreset], items: Sequence[str]
) -> dict[str, dict[str, object]]:
    """Domain options per column (``DOMAIN.KEY=VALUE`` or unscoped), checked and typed by each plugin."""
    classes = {column: domain_class(presets[column].domain) for column in columns}
    takes = {column: cls.option_specs() for column, cls in classes.items()}
    options = scoped_options("--domain-option", items, takes, "DOMAIN")
    return {column: classes[column].checked_options(given) for column, given in options.items() if given}


def bench_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this matrix, every default spelt out."""
    argv = ["wsss-domains", "bench", "--methods", args.methods, "--domains", args.domains]
    argv += ["--budget-minutes", f"{args.budget_minutes:g}", "--out", str(args.out)]
    if getattr(args, "folds", 1) != 1 or getattr(args, "seeds", "0") != "0":
        argv += ["--folds", str(args.folds), "--seeds", args.seeds]
    if getattr(args, "stratified", False):
        argv += ["--stratified"]
    argv += ["--data-root", str(args.data_root), "--device", args.device]
    if getattr(args, "random_patches", None):
        argv += ["--random-patches", str(args.random_patches)]
    if getattr(args, "presets", None) is not None:
        argv += ["--presets", str(args.presets)]
    for item in args.method_option:
        argv += ["--method-option", item]
    for item in getattr(args, "domain_option", []):
        argv += ["--domain-option", item]
    for item in getattr(args, "accumulate_batches", []):
        argv += ["--accumulate-batches", item]
    for flag in MODEL_FLAGS:
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.retry_failed:
        argv.append("--retry-failed")
    return shlex.join(argv)


def run_bench(args: argparse.Namespace, presets: Mapping[str, CellPreset] = DEFAULT_PRESETS) -> int:
    """Validate, run every cell (resuming), rewrite the report after each; presets are injectable."""
    if getattr(args, "presets", None) is not None:
        presets = load_presets(args.presets)
    known = list_methods()
    methods = ordered_methods(
        parse_names(expand_method_groups(args.methods, known), known, "method", chains=True)
    )
    domains = parse_names(args.domains, list(presets), "domain")
    if not args.budget_minutes > 0:
        raise CliError(f"--budget-minutes must be positive, got {args.budget_minutes:g}")
    device = resolve_device(args.device)
    if getattr(args, "random_patches", None):
        if args.random_patches < 1:
            raise CliError(f"--random-patches must be at least 1, got {args.random_patches}")
        presets = {
            name: replace(p, random_patches=args.random_patches) if p.labels_from_masks else p
            for name, p in presets.items()
        }
    for domain in domains:
        folder = presets[domain].data(args.data_root)
        if not folder.is_dir():
            raise CliError(f"{folder}: data of domain '{domain}' not found (--data-root {args.data_root})")
    for column, options in scoped_domain_options(
        domains, presets, getattr(args, "domain_option", [])
    ).items():
        presets = {
            **presets,
            column: replace(presets[column], domain_options={**presets[column].domain_options, **options}),
        }
    flags = {flag: getattr(args, flag) for flag in MODEL_FLAGS}
    folds, seeds = getattr(args, "folds", 1), parse_seeds(getattr(args, "seeds", "0"))
    if folds < 1:
        raise CliError(f"--folds must be at least 1, got {folds}")
    stratified = bool(getattr(args, "stratified", False))
    if stratified and folds < 2:
        raise CliError("--stratified balances folds: give --folds K with K >= 2")
    replicated = folds > 1 or seeds != [0]
    settings = MatrixSettings(
        out=args.out,
        data_root=args.data_root,
        budget_minutes=args.budget_minutes,
        device=device,
        method_options=scoped_method_options(methods, args.method_option, flags),
        retry_failed=args.retry_failed,
        progress=args.progress,
        stages_in_child=not getattr(args, "in_process", False),
        accumulate_batches=accumulation_by_method(
            methods, getattr(args, "accumulate_batches", []), presets, domains
        ),
    )
    command, machine = bench_command(args), machine_info(device)
    preset_dicts = {d: presets[d].to_dict() for d in domains}

    columns, run_presets, replicates = domains, presets, {}
    if replicated:
        run_presets, replicates = expand(presets, domains, folds, seeds, stratified)
        columns = list(run_presets)
        for d in domains:
            preset_dicts[d].update(
                folds=folds if fold_pool(presets[d]) else 1, seeds=seeds, pool=fold_pool(presets[d])
            )
            if stratified and fold_pool(presets[d]):
                preset_dicts[d]["stratified"] = True

    def shown(cells: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
        return aggregate(cells, replicates, methods, BASELINE) if replicated else cells

    def report(cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
        matrix = build_matrix(
            shown(cells), domains, methods, command, machine, preset_dicts, args.budget_minutes
        )
        return write_outputs(args.out, matrix)

    ran = run_matrix(columns, methods, settings, run_presets, on_cell=report)
    paths, cells = report(ran), shown(ran)
    failed = sum(c["status"] != "ok" for row in cells.values() for c in row.values())
    missing = sum(bool(c.get("weights_missing")) for row in cells.values() for c in row.values())
    print(
        f"matrix: {paths['markdown']}  ({paths['json'].name}, {paths['heatmap'].name}, {paths['html'].name})"
    )
    if failed:
        why = f" ({missing} for want of pretrained weights not on this machine)" if missing else ""
        print(f"{failed} of {len(domains) * len(methods)} cells failed{why}; see {paths['markdown']}")
    return 0
