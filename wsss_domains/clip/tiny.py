"""A tiny randomly initialised open_clip model, for tests and benchmarks on machines without weights.

Its outputs carry no meaning; it exists so CLIP code paths (shapes, gradients, adapters, artefact
round trips, timing) are exercised by the same open_clip classes that load real checkpoints.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 3},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_model_config(**vision: Any) -> dict[str, Any]:
    """:data:`TINY_CONFIG` with vision-tower overrides (e.g. ``image_size=224, patch_size=16``)."""
    config = copy.deepcopy(TINY_CONFIG)
    config["vision_cfg"].update(vision)
    return config


def tiny_clip(
    seed: int = 0, config: dict[str, Any] | None = None, attention_sharpness: float = 4.0
) -> tuple[torch.nn.Module, Any]:
    """A random-weight open_clip ``CLIP``, frozen and in eval mode like :func:`load_clip`'s, and its
    built-in (offline) tokenizer.

    The image tower's query/key projections are scaled by ``attention_sharpness``: at random init
    attention is almost uniform, which would make CLIP-ES's attention affinity a blur and its
    normalised output mostly rounding noise; a trained ViT attends far more selectively.
    """
    from open_clip import SimpleTokenizer
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = copy.deepcopy(config or TINY_CONFIG)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(
            config["embed_dim"],
            vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
            text_cfg=CLIPTextCfg(**config["text_cfg"]),
        )
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            dim = block.attn.embed_dim
            block.attn.in_proj_weight[: 2 * dim] *= attention_sharpness
    return model.eval().requires_grad_(False), SimpleTokenizer(
        context_length=config["text_cfg"]["context_length"]
    )


def save_tiny_clip(
    folder: Path, name: str, seed: int = 0, config: dict[str, Any] | None = None
) -> tuple[Path, torch.nn.Module]:
    """Register the tiny architecture with open_clip as ``name`` and save a random checkpoint of it
    under ``folder``, as a user's named model and ``--clip-weights`` file would be; returns the
    checkpoint's path and the model."""
    import open_clip

    config = config or TINY_CONFIG
    configs = Path(folder) / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    model, _ = tiny_clip(seed=seed, config=config)
    path = Path(folder) / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path, model
