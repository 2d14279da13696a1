"""MaskCLIP dense features (Zhou et al., ECCV 2022): CLIP's image tower read per patch.

Why: CLIP's pooled embedding says what an image holds, not where. MaskCLIP observes that the value
path of the last attention block keeps each patch's own content in the embedding space the text
tower matches: skip the last block's query-key mixing, push each patch's *value* through the block's
output projection, residual and MLP, then ``ln_post`` and the projection, and compare it with the
text embeddings by cosine. As the ViT branch CARB uses (k0u-id/CARB, ``mmseg/models/backbones/vit.py``
with ``return_qkv=True`` and ``final_norm``; ``carb_head.py: gen_clip_mask``):

``v = out_proj(W_v ln_1(x)) + x``, ``v = v + mlp(ln_2(v))``, ``f = proj(ln_post(v))``, per patch,
``score_c = <f / |f|, t_c>`` with ``t_c`` the class's normalised text embedding.

The blocks before the last run as in open_clip (positional embeddings interpolated to the image's
patch grid, as CLIP-ES does here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_domains.clip.vit import block_forward, embed


def value_path(block: nn.Module, x: Tensor) -> Tensor:
    """The last block run on its values only: ``B x T x D`` tokens in, ``B x T x D`` out."""
    attn = block.attn
    dim = attn.embed_dim
    y = block.ln_1(x)
    v = F.linear(y, attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])
    v = F.linear(v, attn.out_proj.weight, attn.out_proj.bias)
    v = x + block.ls_1(v)
    return v + block.ls_2(block.mlp(block.ln_2(v)))


@torch.no_grad()
def dense_features(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Normalised per-patch embeddings ``B x E x h x w`` of ``pixels`` (``B x 3 x H x W``, CLIP-normalised)."""
    x, grid = embed(visual, pixels)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x, _ = block_forward(block, x)
    v = visual.ln_post(value_path(blocks[-1], x))[:, 1:]
    if visual.proj is not None:
        v = v @ visual.proj
    v = F.normalize(v.float(), dim=-1)
    return v.transpose(1, 2).reshape(v.shape[0], -1, *grid), grid
