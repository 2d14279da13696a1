"""The CAM classifier: a timm backbone and a bias-free 1x1 convolution over its feature map.

With a bias-free head, global average pooling commutes with the head, so the class activation maps
are simply ``head(features)`` and the logits their spatial mean: one forward pass gives every
class's CAM at once.
"""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsss_domains.models.weights import load_backbone_weights

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


class CamClassifier(nn.Module):
    """Multi-label classifier whose head produces class activation maps."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | None = "imagenet",
        output_stride: int = 16,
        pooling: str = "gap",
    ) -> None:
        super().__init__()
        self.backbone = self.create_backbone(backbone, output_stride)
        self.weights_source = load_backbone_weights(self.backbone, backbone, weights)
        self.head = nn.Conv2d(self.backbone.num_features, num_classes, kernel_size=1, bias=False)
        if pooling not in ("gap", "gmp", "lse"):
            raise ValueError(f"unknown pooling '{pooling}' (gap, gmp, lse)")
        self.pooling = pooling
        self.num_classes = num_classes

    @staticmethod
    def create_backbone(name: str, output_stride: int) -> nn.Module:
        """The timm feature extractor (no classifier, no pooling); subclasses build other families."""
        kwargs = {"output_stride": output_stride} if output_stride != 32 else {}
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)

    def pool(self, cams: Tensor) -> Tensor:
        if self.pooling == "gap":
            return cams.mean(dim=(2, 3))
        if self.pooling == "gmp":
            return cams.amax(dim=(2, 3))
        r = 5.0  # log-sum-exp pooling sharpness, between average (r->0) and max (r->inf)
        flat = cams.flatten(2)
        return (
            torch.logsumexp(r * flat, dim=2) - torch.log(torch.tensor(flat.shape[2], dtype=flat.dtype))
        ) / r

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits, raw (un-rectified) CAMs and the feature map, for losses that need any of them."""
        feats = self.features(x)
        cams = self.head(feats)
        return {"logits": self.pool(cams), "cams": cams, "features": feats}

    @torch.no_grad()
    def cams(self, x: Tensor, rectify: bool = True) -> Tensor:
        """CAMs at feature resolution, ``B x K x h x w``: rectified, or raw per-pixel class logits."""
        maps = self.head(self.features(x))
        return F.relu(maps) if rectify else maps
