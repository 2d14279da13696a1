"""Toy-sized SAM built from segment_anything's classes, shared by the SAM tests."""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

TINY_SIZE = 64  # encoder input side; embedding 8x8, low-res masks 32x32
TINY_DIM = 32


def build_tiny_sam(seed: int = 0) -> Sam:
    """SAM's architecture at toy size: ViT encoder 2 blocks x 32 dims, decoder 1 layer."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=TINY_SIZE,
        patch_size=8,
        embed_dim=TINY_DIM,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        out_chans=TINY_DIM,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=TINY_DIM,
        image_embedding_size=(TINY_SIZE // 8, TINY_SIZE // 8),
        input_image_size=(TINY_SIZE, TINY_SIZE),
        mask_in_chans=4,
    )
    decoder = MaskDecoder(
        transformer_dim=TINY_DIM,
        transformer=TwoWayTransformer(depth=1, embedding_dim=TINY_DIM, num_heads=2, mlp_dim=64),
        num_multimask_outputs=3,
        iou_head_depth=2,
        iou_head_hidden_dim=TINY_DIM,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()
