"""Learned-prompt artefacts on disk: ``<root>/<domain>/<name>/``, loadable by name.

Artefacts a user learns go to a user data folder (:func:`user_prompts_root`: ``$WSSS_DATA_HOME``,
else ``$XDG_DATA_HOME/wsss-domains``, else ``~/.local/share/wsss-domains``, then ``prompts/``), never
into the installed package; artefacts shipped with the package (:func:`prompts_root`) are found too.
By name, the user's artefact wins over a shipped one of the same name.

A folder holds ``context.safetensors`` (context vectors and background prompt embeddings),
``manifest.json`` (CLIP architecture, classes, background words, n_ctx, a checksum of the frozen
CLIP weights, creation date) and, when LoRA was used, peft's own adapter files
(``adapter_config.json``, ``adapter_model.safetensors``). The checksum ties an artefact to the
exact checkpoint it was learned on: loading it onto other weights is an error, not a silent
mismatch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsss_domains.clip.learned_prompts import PromptLearner, freeze

FORMAT = "wsss-domains/learned-prompts@1"
MANIFEST = "manifest.json"
CONTEXT_FILE = "context.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LearnedPromptsError(ValueError):
    """A learned-prompt artefact is missing, malformed or belongs to other CLIP weights."""

    exit_code = 2


def frozen_checksum(model: nn.Module) -> str:
    """SHA-256 over the CLIP state dict without LoRA weights, identical before and after injection."""
    digest = hashlib.sha256()
    entries = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        entries[key.replace(".base_layer", "")] = value
    for key in sorted(entries):
        value = entries[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def prompts_root() -> Path:
    """The installed ``wsss_prompts`` folder (``prompts/`` of the repository)."""
    return Path(str(resources.files("wsss_prompts")))


def user_prompts_root() -> Path:
    """Where learned prompts are written: a per-user data folder, outside the installed package."""
    base = os.environ.get("WSSS_DATA_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "wsss-domains"
    )
    return Path(base) / "prompts"


def artefact_dir(domain: str, name: str, root: Path | None = None) -> Path:
    """The folder of artefact ``name``: under ``root``; by default where it exists (the user's folder
    first, then the package's), else where a new one is written (the user's folder)."""
    if not name or "/" in name or name.startswith(".") or name == "prompts.json":
        raise LearnedPromptsError(f"invalid learned-prompt name {name!r}")
    if root is not None:
        return Path(root) / domain / name
    user, shipped = user_prompts_root() / domain / name, prompts_root() / domain / name
    return shipped if (shipped / MANIFEST).is_file() and not (user / MANIFEST).is_file() else user


def save_learned_prompts(
    learner: PromptLearner,
    directory: Path,
    *,
    clip_model: str,
    domain: str | None = None,
    dataset: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``learner`` (and LoRA adapters in its CLIP model, if any) to ``directory``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = learner.clip
    tensors = {"ctx": learner.ctx.detach().cpu().contiguous()}
    for i, emb in enumerate(learner.background_embeddings):
        tensors[f"background.{i}"] = emb.detach().cpu().contiguous()
    save_file(tensors, str(directory / CONTEXT_FILE))
    lora = getattr(model, "peft_config", {}).get("default")
    if lora is not None:
        lora.save_pretrained(str(directory))
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(adapter, str(directory / ADAPTER_WEIGHTS))
    manifest = {
        "format": FORMAT,
        "name": directory.name,
        "domain": domain,
        "dataset": dataset,
        "clip_model": clip_model,
        "classes": learner.class_texts,
        "background": learner.background_words,
        "n_ctx": learner.n_ctx,
        "ctx_init": learner.ctx_init,
        "lora": None
        if lora is None
        else {"rank": lora.r, "alpha": lora.lora_alpha, "target_modules": str(lora.target_modules)},
        "frozen_checksum": frozen_checksum(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "training": training or {},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise LearnedPromptsError(f"no learned prompts at {directory} (missing {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise LearnedPromptsError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def load_learned_prompts(
    name_or_dir: str | Path,
    model: nn.Module,
    tokenizer: Any,
    *,
    domain: str | None = None,
    root: Path | None = None,
    clip_model: str | None = None,
) -> PromptLearner:
    """Load an artefact by ``name`` (with ``domain``) or folder onto ``model``, checking its weights.

    LoRA adapters, when the artefact has them, are injected into ``model`` in place. The model is
    frozen as it was during training, which also keeps PyTorch on the same attention kernels, so
    logits are reproduced bit for bit.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(name_or_dir) if domain is None else artefact_dir(domain, str(name_or_dir), root)
    manifest = read_manifest(directory)
    if clip_model is not None and manifest["clip_model"] != clip_model:
        raise LearnedPromptsError(
            f"{directory.name} was learned with CLIP '{manifest['clip_model']}', not '{clip_model}'"
        )
    if frozen_checksum(model) != manifest["frozen_checksum"]:
        raise LearnedPromptsError(
            f"{directory.name} was learned on other CLIP weights ('{manifest['clip_model']}', "
            f"{manifest['frozen_checksum'][:19]}...); load the checkpoint it was learned with"
        )
    learner = PromptLearner(
        model, tokenizer, manifest["classes"], manifest["background"], ctx_init=None, n_ctx=manifest["n_ctx"]
    )
    tensors = load_file(str(directory / CONTEXT_FILE))
    expected = {
        "ctx": learner.ctx,
        **{f"background.{i}": e for i, e in enumerate(learner.background_embeddings)},
    }
    if set(tensors) != set(expected):
        raise LearnedPromptsError(
            f"{directory / CONTEXT_FILE}: tensors {sorted(tensors)} do not match the manifest"
        )
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise LearnedPromptsError(
                    f"{key}: saved shape {tuple(tensors[key].shape)} != {tuple(param.shape)}"
                )
            param.copy_(tensors[key])
    if manifest.get("lora"):
        if getattr(model, "peft_config", None):
            raise LearnedPromptsError("this CLIP model already carries LoRA adapters; load a fresh model")
        inject_adapter_in_model(LoraConfig.from_pretrained(str(directory)), model)
        result = set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
        if getattr(result, "unexpected_keys", None):
            raise LearnedPromptsError(f"adapter weights do not fit the model: {result.unexpected_keys[:3]}")
    freeze(model)
    learner.ctx_init = manifest.get("ctx_init")
    return learner


def list_learned_prompts(root: Path | None = None) -> list[dict[str, Any]]:
    """Manifests of every artefact under ``root`` (default: the user's folder and the package's)."""
    bases = [Path(root)] if root is not None else [user_prompts_root(), prompts_root()]
    found = []
    for path in [p for base in bases for p in sorted(base.glob(f"*/*/{MANIFEST}"))]:
        try:
            manifest = read_manifest(path.parent)
        except (LearnedPromptsError, json.JSONDecodeError):
            continue
        found.append({**manifest, "path": str(path.parent)})
    return found
