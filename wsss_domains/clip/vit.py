"""Running an open_clip ViT image tower the way CLIP-ES needs it.

open_clip's own forward fixes the input size, discards attention maps and pools the class token.
CLIP-ES instead feeds the image near its original size (positional embeddings interpolated
bilinearly), keeps every block's head-averaged attention for affinity refinement, and pools the
image embedding as the *mean of the patch tokens* after ``ln_post`` (the official
``forward_last_layer``; its class-token line is commented out). The helpers here run the tower's
own modules in that order, so LoRA adapters injected into them stay active.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_domains.clip.loading import ClipUnsupported, clip_mean_std


def vision_transformer(model: nn.Module) -> nn.Module:
    """The model's open_clip ``VisionTransformer``; a clear error for towers CLIP-ES cannot read."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ClipUnsupported(
            f"CLIP-ES needs an open_clip ViT image tower, got {type(visual).__name__}; use e.g. ViT-B-16"
        )
    if visual.attn_pool is not None:
        raise ClipUnsupported("CLIP-ES does not support ViT towers with attentional pooling (CoCa)")
    if not getattr(visual.transformer, "batch_first", True):
        raise ClipUnsupported("CLIP-ES needs a batch-first open_clip transformer")
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise ClipUnsupported(
                f"CLIP-ES needs standard attention blocks, got {type(block).__name__} "
                f"({type(getattr(block, 'attn', None)).__name__})"
            )
    return visual


def patch_size(visual: nn.Module) -> tuple[int, int]:
    p = visual.patch_size
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def prepare_pixels(model: nn.Module, image: Tensor, size: tuple[int, int]) -> Tensor:
    """A ``3xHxW`` image in [0, 1] resized (bicubic, as CLIP-ES) and normalised: ``1x3xhxw``."""
    visual = getattr(model, "visual", model)
    mean, std = clip_mean_std(model)
    x = image.float()[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    weight = visual.conv1.weight
    return x.to(device=weight.device, dtype=weight.dtype)


def interpolated_pos_embed(visual: nn.Module, grid: tuple[int, int]) -> Tensor:
    """Positional embeddings for a ``grid`` of patches: bilinear resize of the trained grid."""
    pos = visual.positional_embedding
    if tuple(grid) == tuple(visual.grid_size):
        return pos
    gh, gw = visual.grid_size
    patches = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bilinear", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def embed(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Patch tokens with class token and positional embedding, after ``ln_pre``: ``B x (1+N) x D``.

    Patch dropout is a training-time regulariser of open_clip and is deliberately not applied.
    """
    x = visual.conv1(pixels)
    grid = (int(x.shape[-2]), int(x.shape[-1]))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolated_pos_embed(visual, grid).to(x.dtype)
    return visual.ln_pre(x), grid


def block_forward(
    block: nn.Module, x: Tensor, ln1: Tensor | None = None, need_weights: bool = False
) -> tuple[Tensor, Tensor | None]:
    """One residual attention block; ``ln1`` overrides ``block.ln_1(x)`` (the GradCAM target).

    Returns the block output and, with ``need_weights``, the head-averaged attention ``B x T x T``.
    """
    a = block.ln_1(x) if ln1 is None else ln1
    out, weights = block.attn(a, a, a, need_weights=need_weights, average_attn_weights=True)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights


def pool_patch_mean(visual: nn.Module, x: Tensor) -> Tensor:
    """CLIP-ES image embedding: ``ln_post`` on all tokens, mean of the patch tokens, projection."""
    pooled = visual.ln_post(x)[:, 1:].mean(dim=1)
    return pooled @ visual.proj if visual.proj is not None else pooled


@dataclass
class PrefixPass:
    """Everything before the last block, computed once per image without gradients."""

    tokens: Tensor  # input of the last block, B x (1+N) x D
    attn_sum: Tensor | None  # sum of the kept blocks' head-averaged attention, B x (1+N) x (1+N)
    attn_count: int
    grid: tuple[int, int]


@torch.no_grad()
def run_prefix(visual: nn.Module, pixels: Tensor, attn_layers: int) -> PrefixPass:
    """Run all blocks but the last, summing attention of those among the last ``attn_layers`` blocks."""
    x, grid = embed(visual, pixels)
    blocks = visual.transformer.resblocks
    first_kept = len(blocks) - attn_layers
    attn_sum, count = None, 0
    for i, block in enumerate(blocks[:-1]):
        keep = i >= first_kept
        x, weights = block_forward(block, x, need_weights=keep)
        if keep:
            attn_sum = weights.float() if attn_sum is None else attn_sum + weights.float()
            count += 1
    return PrefixPass(tokens=x, attn_sum=attn_sum, attn_count=count, grid=grid)


def image_embedding(visual: nn.Module, pixels: Tensor) -> Tensor:
    """The CLIP-ES (patch-mean) image embedding through every block, gradients as the caller allows."""
    x, _ = embed(visual, pixels)
    for block in visual.transformer.resblocks:
        x, _ = block_forward(block, x)
    return pool_patch_mean(visual, x)
