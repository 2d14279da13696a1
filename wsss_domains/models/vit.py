"""The CAM classifier on a timm Vision Transformer: patch tokens laid out as a feature map.

Why: ViT-based WSSS (ToCo) computes CAMs from the patch tokens exactly as a CNN does from its last
feature map: a bias-free 1x1 convolution over the ``D x h x w`` grid of tokens. Reshaping the
tokens therefore lets the same head, pooling, CAM extractor and pseudo-label pipeline serve both
families. The backbone accepts any input size (timm's dynamic image size, with padding to whole
patches), so multi-scale CAM extraction works unchanged; the class token is returned alongside.
"""

from __future__ import annotations

import timm
from timm.models import model_entrypoint
from torch import Tensor, nn

from wsss_domains.models.classifier import CamClassifier

VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def is_vit_backbone(name: str) -> bool:
    """Whether ``name`` is a timm ViT / DeiT (plain patch-token transformers)."""
    try:
        return model_entrypoint(name).__module__ in VIT_MODULES
    except (KeyError, RuntimeError):  # unknown name: not ours to judge; timm reports it on creation
        return False


class VitCamClassifier(CamClassifier):
    """:class:`CamClassifier` over a timm ViT; ``output_stride`` is the patch size and is ignored."""

    @staticmethod
    def create_backbone(name: str, output_stride: int) -> nn.Module:
        if not is_vit_backbone(name):
            raise ValueError(f"'{name}' is not a timm ViT/DeiT backbone")
        return timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", dynamic_img_size=True, dynamic_img_pad=True
        )

    def tokens_to_map(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """``B x N x D`` tokens (prefix tokens first) of an ``H x W`` input -> ``B x D x h x w`` patch map."""
        h, w = self.backbone.patch_embed.dynamic_feat_size(size)
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def features(self, x: Tensor) -> Tensor:
        return self.tokens_to_map(self.backbone.forward_features(x), (x.shape[-2], x.shape[-1]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """As :meth:`CamClassifier.forward`, plus ``class_token`` (the normalised class token, ``B x D``)."""
        tokens = self.backbone.forward_features(x)
        feats = self.tokens_to_map(tokens, (x.shape[-2], x.shape[-1]))
        cams = self.head(feats)
        return {"logits": self.pool(cams), "cams": cams, "features": feats, "class_token": tokens[:, 0]}
