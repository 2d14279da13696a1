"""``prompts`` subcommands for the main CLI: learn a domain's prompts, list prompt files and artefacts.

Wiring: ``add_prompts_subcommand(subparsers)`` adds ``prompts learn`` and ``prompts list``; each
sets ``args.func(args) -> int`` (the exit code). Every CLIP command checks its weights before
touching data, so a missing checkpoint fails at once with one message and exit code 2, without any
network call. :func:`add_clip_arguments` gives other CLIP commands the same ``--clip`` options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsss_domains.cli import command_help
from wsss_domains.cli.common import add_domain_option_argument, domain_options

DEFAULT_CLIP = "ViT-B-16"


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clip MODEL`` and ``--clip-weights PATH``, shared by every CLIP command."""
    parser.add_argument(
        "--clip",
        default=DEFAULT_CLIP,
        metavar="MODEL",
        help=f"open_clip architecture (default {DEFAULT_CLIP})",
    )
    parser.add_argument(
        "--clip-weights",
        metavar="PATH",
        default=None,
        help="local checkpoint of that architecture (file, folder, or an already cached pretrained tag); "
        "OpenAI weights as a plain state dict need the -quickgelu architecture. Never downloaded.",
    )


def add_prompts_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``prompts {learn,list}`` to the main CLI's subparsers; returns the ``prompts`` parser."""
    prompts = subparsers.add_parser("prompts", help=command_help("prompts"))
    commands = prompts.add_subparsers(dest="prompts_command", required=True)

    learn = commands.add_parser(
        "learn", help="learn context + background prompts (and LoRA) from image labels"
    )
    learn.add_argument("--domain", required=True, help="domain plugin name (e.g. remote-sensing)")
    add_domain_option_argument(learn, recorded=False)
    add_clip_arguments(learn)
    learn.add_argument(
        "--dataset", default=None, help="dataset loader name (detected from --data if omitted)"
    )
    learn.add_argument("--data", type=Path, default=None, metavar="DIR", help="dataset folder")
    learn.add_argument("--split", default=None, help="split to learn from (default: the dataset's default)")
    learn.add_argument(
        "--name", default="learned", help="artefact name under prompts/<domain>/ (default learned)"
    )
    learn.add_argument("--lora", action="store_true", help="also train LoRA adapters on both CLIP towers")
    learn.add_argument("--epochs", type=int, default=10)
    learn.add_argument("--batch-size", type=int, default=16)
    learn.add_argument("--lr", type=float, default=2e-3)
    learn.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    learn.set_defaults(func=run_learn)

    listing = commands.add_parser("list", help="list prompt files and learned prompt artefacts")
    listing.set_defaults(func=run_list)
    return prompts


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_learn(args: argparse.Namespace) -> int:
    """``prompts learn``: weights are checked first, then data, then training and saving."""
    import torch

    from wsss_domains.clip.artefacts import artefact_dir, save_learned_prompts
    from wsss_domains.clip.learned_prompts import PromptTrainConfig, train_prompts
    from wsss_domains.clip.loading import ClipUnsupported, ClipWeightsMissing, load_clip, resolve_clip_weights
    from wsss_domains.domains import create_domain

    try:
        weights = resolve_clip_weights(args.clip, args.clip_weights)
    except (ClipWeightsMissing, ClipUnsupported) as err:
        return _fail(str(err))
    if args.data is None:
        return _fail("prompts learn needs --data DIR with images and image-level labels")
    try:
        domain = create_domain(args.domain, **domain_options(args))
        spec = domain.dataset(args.dataset) if args.dataset else domain.detect_dataset(args.data)
    except (KeyError, ValueError, FileNotFoundError) as err:
        return _fail(str(err.args[0]) if err.args else str(err))
    split = args.split or spec.default_split or spec.splits[0]
    dataset = spec.build(args.data, split)
    prompts = domain.clip_prompts(spec.label_space)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer, _, _ = load_clip(args.clip, weights, device)
    except ClipUnsupported as err:
        return _fail(str(err))
    config = PromptTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lora=args.lora)
    print(f"learning prompts for {domain.name}/{spec.name} ({split}, {len(dataset)} images) on {args.clip}")
    result = train_prompts(
        model,
        tokenizer,
        dataset,
        prompts,
        config,
        class_order=spec.label_space.foreground_names,
        transform=domain.preprocess,
        progress=lambda epoch, loss: print(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4f}"),
    )
    out = save_learned_prompts(
        result.learner,
        artefact_dir(domain.name, args.name),
        clip_model=args.clip,
        domain=domain.name,
        dataset=spec.name,
        training={
            "split": split,
            "images": len(dataset),
            "epochs": config.epochs,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "lora": config.lora,
            "epoch_losses": [round(v, 6) for v in result.epoch_losses],
            "weights_file": weights.name,
        },
    )
    print(f"saved {out}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``prompts list``: the prompt files per domain, then every learned artefact."""
    from wsss_domains.clip.artefacts import list_learned_prompts
    from wsss_domains.clip.prompt_files import load_prompt_file, prompt_file_domains

    print("prompt files:")
    for domain in prompt_file_domains():
        datasets = load_prompt_file(domain)["datasets"]
        summary = ", ".join(f"{name} ({len(entry['classes'])} classes)" for name, entry in datasets.items())
        print(f"  {domain}: {summary}")
    artefacts = list_learned_prompts()
    print("learned prompts:" if artefacts else "learned prompts: none")
    for m in artefacts:
        lora = " +LoRA" if m.get("lora") else ""
        print(
            f"  {m.get('domain')}/{Path(m['path']).name}: {m['clip_model']}{lora}, {len(m['classes'])} classes, "
            f"n_ctx {m['n_ctx']}, created {m['created']}"
        )
    return 0
