"""Loading an open_clip model from a checkpoint the user already has, never from the network.

CLIP weights are large and licensed separately, so the toolkit never downloads them: a user names
an open_clip architecture and a local checkpoint (``--clip-weights PATH``), or a checkpoint that
open_clip or Hugging Face already cached on this machine is used. Anything else is one
:class:`ClipWeightsMissing` error that says what to provide.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from wsss_domains.models.weights import WeightsNotFound

# Preferred file names inside a checkpoint folder (open_clip's Hub layout first).
_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ClipWeightsMissing(WeightsNotFound):
    """No usable local CLIP checkpoint; the message names what to pass. CLI exit code 2."""

    exit_code = 2


class ClipUnsupported(ValueError):
    """The named open_clip architecture cannot run offline or lacks what a CLIP method needs."""

    exit_code = 2


class ClipCheckpointMismatch(ClipUnsupported):
    """The checkpoint exists but does not fit the named architecture."""


class LoadedClip(NamedTuple):
    """A ready model, its tokenizer and where its weights came from (unpacks like a tuple)."""

    model: torch.nn.Module
    tokenizer: Any
    weights: Path
    model_name: str


def _missing(model_name: str, reason: str) -> ClipWeightsMissing:
    return ClipWeightsMissing(
        f"no CLIP weights for '{model_name}': {reason}. Pass --clip-weights PATH to a local open_clip or "
        "OpenAI checkpoint of this architecture (nothing is downloaded)."
    )


def _model_config(model_name: str) -> dict[str, Any]:
    import open_clip

    if ":" in model_name:
        raise ClipUnsupported(
            f"'{model_name}': hub/local-dir model names are not supported; give an open_clip architecture "
            "name (see open_clip.list_models()) and --clip-weights PATH"
        )
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ClipUnsupported(f"unknown open_clip architecture '{model_name}' (see open_clip.list_models())")
    return config


def _check_offline_capable(model_name: str, config: dict[str, Any]) -> None:
    """Refuse architectures whose tokenizer or text tower would be fetched from the Hugging Face Hub."""
    text_cfg = config.get("text_cfg", {})
    hf_parts = [text_cfg.get(k) for k in ("hf_tokenizer_name", "hf_model_name") if text_cfg.get(k)]
    if "siglip" in model_name.lower() and not text_cfg.get("hf_tokenizer_name"):
        hf_parts.append("SigLIP tokenizer")
    if hf_parts and os.environ.get("HF_HUB_OFFLINE") != "1":
        raise ClipUnsupported(
            f"'{model_name}' needs Hugging Face files ({', '.join(hf_parts)}) that could trigger a download; "
            "set HF_HUB_OFFLINE=1 with them in your HF cache, or use an architecture with open_clip's "
            "built-in tokenizer (e.g. ViT-B-16)"
        )


def _checkpoint_in_dir(folder: Path) -> Path | None:
    for name in _CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
    return found[0] if len(found) == 1 else None


def _cached_for_tag(model_name: str, tag: str) -> Path | None:
    """Where open_clip or the HF hub would have cached ``tag``'s checkpoint, if it is there."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # 'org/repo/' or 'org/repo/file.bin', as open_clip reads it
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        for name in names:
            hit = try_to_load_from_cache(repo_id, name)  # cache lookup only, no request
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = cfg.get("url", "")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _resolve(model_name: str, weights: Path | str | None) -> tuple[Path, bool]:
    """The checkpoint file and whether its pretrained tag was trained with QuickGELU."""
    import open_clip

    config = _model_config(model_name)
    _check_offline_capable(model_name, config)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path, False
        if path.is_dir():
            found = _checkpoint_in_dir(path)
            if found is None:
                raise _missing(model_name, f"folder {path} holds no single checkpoint file")
            return found, False
        if str(weights) not in tags:
            raise _missing(model_name, f"{path} does not exist")
        tags = [str(weights)]
    for tag in tags:
        cached = _cached_for_tag(model_name, tag)
        if cached is not None:
            return cached, bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    if weights is not None:
        raise _missing(model_name, f"pretrained tag '{weights}' is not in the local cache")
    raise _missing(model_name, "none given and none found in the open_clip / Hugging Face cache")


def resolve_clip_weights(model_name: str, weights: Path | str | None) -> Path:
    """The local checkpoint file for ``model_name``; :class:`ClipWeightsMissing` when there is none.

    ``weights`` is a file, a folder holding one checkpoint, a pretrained tag of ``model_name`` that is
    already cached, or None to look for any cached tag. No network call is made. OpenAI weights saved
    as a plain state dict need the ``-quickgelu`` architecture name (e.g. ``ViT-B-16-quickgelu``);
    OpenAI's TorchScript ``.pt`` files and cached tags get the right activation automatically.
    """
    return _resolve(model_name, weights)[0]


def clip_embed_dim(model_name: str) -> int:
    """The width of ``model_name``'s joint embedding, read from its open_clip config (no weights needed)."""
    return int(_model_config(model_name)["embed_dim"])


def clip_text_shape(model_name: str) -> tuple[int, int]:
    """The width of ``model_name``'s text token embeddings and its context length (tokens), read from
    its open_clip config (no weights needed; open_clip's defaults where the config is silent)."""
    text = _model_config(model_name)["text_cfg"]
    return int(text.get("width", 512)), int(text.get("context_length", 77))


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original CLIP releases are TorchScript zips, which carry their own architecture."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_clip(
    model_name: str,
    weights: Path | str | None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> LoadedClip:
    """Build ``model_name`` with local ``weights`` (see :func:`resolve_clip_weights`), frozen, in eval mode."""
    import open_clip

    path, quick_gelu = _resolve(model_name, weights)
    try:
        if _is_torchscript_archive(path):
            model = open_clip.load_openai_model(str(path), precision=precision, device=device)
        else:
            model = open_clip.create_model(
                model_name,
                pretrained=str(path),
                precision=precision,
                device=device,
                pretrained_image=False,
                pretrained_text=False,
                force_quick_gelu=quick_gelu,
            )
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClipCheckpointMismatch(
            f"{path} does not fit open_clip architecture '{model_name}': {first}"
        ) from err
    # CLIP itself is never fine-tuned here (adapters are added and trained through peft).
    model.eval().requires_grad_(False)
    context_length = getattr(model, "context_length", None)
    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
    return LoadedClip(model=model, tokenizer=tokenizer, weights=path, model_name=model_name)


def clip_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pixel mean and std the model was trained with (OpenAI's statistics when it does not say)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = getattr(model, "visual", model)
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
