"""TinyViT-encoder SAMs (LiteMedSAM, MobileSAM) assembled from timm's TinyViT and segment_anything.

LiteMedSAM and MobileSAM replace SAM's ViT with the 5M-parameter TinyViT (timm's
``tiny_vit_5m_224``: dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10, windows 7/7/14/7) plus
SAM's neck (conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d to 256 channels). Building them from
timm keeps one maintained TinyViT implementation in the project instead of vendoring a third.

Two structural edits make timm's classification TinyViT hold the SAM encoders exactly:

* the last patch merging (160 -> 320 channels) keeps the resolution (stride 1), so the encoder
  output stays at 1/16 of a 1024 px input (64x64) as SAM's mask decoder expects;
* LiteMedSAM's stem is two 1x1 stride-1 convolutions (not timm's two 3x3 stride-2 ones): its
  256 px input goes through the stages at full resolution and still ends at 64x64.

Checkpoints in the MobileSAM layout (``layers.i`` with patch merging at the *end* of a stage,
``Conv2d_BN`` sub-modules named ``c``) are renamed into timm's layout (``stages.i`` with patch
merging at the *start* of the next stage, ``ConvNorm`` sub-modules named ``conv``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import timm
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import ConvNorm
from torch import Tensor, nn

TIMM_TINY_VIT = "tiny_vit_5m_224"
EMBED_DIM = 256  # SAM's prompt / image-embedding width
LITE_MEDSAM_SIZE = 256
MOBILE_SAM_SIZE = 1024
# LiteMedSAM reads the image in [0, 1] (min-max normalised); Sam.preprocess gets it in [0, 255].
LITE_MEDSAM_PIXEL_MEAN = (0.0, 0.0, 0.0)
LITE_MEDSAM_PIXEL_STD = (255.0, 255.0, 255.0)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# MobileSAM-layout encoder keys -> timm layout, tried in order on the key without "image_encoder.".
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^patch_embed\.seq\.0\."), "trunk.patch_embed.conv1."),
    (re.compile(r"^patch_embed\.seq\.2\."), "trunk.patch_embed.conv2."),
    (re.compile(r"^layers\.(\d+)\.blocks\."), r"trunk.stages.\1.blocks."),
    (re.compile(r"^neck\."), "neck."),
)
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
# Classification head of the TinyViT that MobileSAM was distilled from: unused by SAM.
_DROPPED = re.compile(r"^(norm_head|head)\.")


class TinyViTImageEncoder(nn.Module):
    """timm's TinyViT-5M trunk plus SAM's neck, mapping ``Bx3xSxS`` to ``Bx256x64x64``."""

    def __init__(self, img_size: int, stem_stride: int) -> None:
        super().__init__()
        if stem_stride not in (1, 4):
            raise ValueError(f"stem_stride must be 1 (LiteMedSAM) or 4 (MobileSAM), got {stem_stride}")
        if img_size // (stem_stride * 4) != 64:
            raise ValueError(f"img_size {img_size} with stem stride {stem_stride} does not give 64x64")
        self.img_size = img_size  # read by segment_anything's Sam.preprocess and SamPredictor
        trunk = timm.create_model(TIMM_TINY_VIT, pretrained=False, num_classes=0)
        trunk.head = nn.Identity()  # SAM uses the feature map, not the classifier head
        dims = [info["num_chs"] for info in trunk.feature_info]
        if stem_stride == 1:
            trunk.patch_embed.conv1 = ConvNorm(3, dims[0] // 2, ks=1, stride=1, pad=0)
            trunk.patch_embed.conv2 = ConvNorm(dims[0] // 2, dims[0], ks=1, stride=1, pad=0)
        last = trunk.stages[-1].downsample
        last.conv2 = ConvNorm(dims[-1], dims[-1], ks=3, stride=1, pad=1, groups=dims[-1])
        self.trunk = trunk
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], EMBED_DIM, kernel_size=1, bias=False),
            LayerNorm2d(EMBED_DIM),
            nn.Conv2d(EMBED_DIM, EMBED_DIM, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(EMBED_DIM),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.neck(self.trunk.forward_features(x))


def build_sam_heads(img_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder, unchanged, for a 64x64 embedding of ``img_size``."""
    prompt_encoder = PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(64, 64),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_lite_medsam_sam() -> Sam:
    """An untrained LiteMedSAM: 256 px input, 1x1 stem, inputs in [0, 1] after ``Sam.preprocess``."""
    prompt_encoder, mask_decoder = build_sam_heads(LITE_MEDSAM_SIZE)
    return Sam(
        image_encoder=TinyViTImageEncoder(LITE_MEDSAM_SIZE, stem_stride=1),
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(LITE_MEDSAM_PIXEL_MEAN),
        pixel_std=list(LITE_MEDSAM_PIXEL_STD),
    )


def build_mobile_sam_sam() -> Sam:
    """An untrained MobileSAM: 1024 px input, TinyViT's usual stride-4 stem, SAM's normalisation."""
    prompt_encoder, mask_decoder = build_sam_heads(MOBILE_SAM_SIZE)
    return Sam(
        image_encoder=TinyViTImageEncoder(MOBILE_SAM_SIZE, stem_stride=4),
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _rename_encoder_key(key: str) -> str | None:
    """timm-layout name of one MobileSAM-layout encoder key; None for keys SAM does not use."""
    if _DROPPED.match(key):
        return None
    if match := _DOWNSAMPLE.match(key):
        # Patch merging closes stage i in MobileSAM and opens stage i + 1 in timm.
        new = f"trunk.stages.{int(match[1]) + 1}.downsample." + key[match.end() :]
    else:
        for pattern, repl in _RENAMES:
            new, hits = pattern.subn(repl, key)
            if hits:
                break
        else:
            raise KeyError(f"unexpected TinyViT encoder key '{key}' in the checkpoint")
    parts = new.split(".")
    if len(parts) >= 2 and parts[-2] == "c":  # Conv2d_BN.c -> ConvNorm.conv
        parts[-2] = "conv"
    return ".".join(parts)


def convert_tinyvit_sam_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LiteMedSAM / MobileSAM checkpoint's state dict renamed for :func:`build_lite_medsam_sam`.

    Prompt-encoder and mask-decoder keys pass through; encoder keys are renamed into timm's
    TinyViT layout; the distillation classifier head (``norm_head``, ``head``) is dropped.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("image_encoder."):
            new = _rename_encoder_key(key[len("image_encoder.") :])
            if new is not None:
                out["image_encoder." + new] = value
        else:
            out[key] = value
    return out


def checkpoint_state_dict(raw: object) -> Mapping[str, Tensor]:
    """The state dict inside a loaded checkpoint (bare, or under ``model`` / ``state_dict``)."""
    if isinstance(raw, Mapping):
        for wrapper in ("model", "state_dict"):
            if wrapper in raw and isinstance(raw[wrapper], Mapping):
                return raw[wrapper]
        return raw  # type: ignore[return-value]
    raise TypeError(f"checkpoint holds a {type(raw).__name__}, not a state dict")


def load_tinyvit_sam(sam: Sam, raw_checkpoint: object) -> Sam:
    """Load a LiteMedSAM / MobileSAM checkpoint into ``sam`` strictly, after renaming its keys."""
    state = convert_tinyvit_sam_state_dict(checkpoint_state_dict(raw_checkpoint))
    sam.load_state_dict(state, strict=True)
    # eval() also drops timm's cached attention biases computed before the weights were loaded.
    return sam.eval()
