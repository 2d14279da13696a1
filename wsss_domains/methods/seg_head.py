"""LargeFOV: the segmentation decoder of ToCo and DuPL (DeepLab-v1's head).

Why: single-stage WSSS trains a segmentation head beside the classifier on the online
pseudo-labels; its per-pixel losses drive DuPL's noisy-label filter and its gradient shapes the
shared features. As ``model/decoder/conv_head.py``: two bias-free 3x3 convolutions of dilation 5
(512 channels) with ReLUs, then a bias-free 1x1 convolution to the classes (background included).
"""

from __future__ import annotations

from torch import Tensor, nn

LARGEFOV_CHANNELS = 512
LARGEFOV_DILATION = 5


class LargeFov(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = LARGEFOV_CHANNELS,
        dilation: int = LARGEFOV_DILATION,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1, bias=False),
        )

    def forward(self, features: Tensor) -> Tensor:
        """Segmentation logits ``B x (K+1) x h x w`` at the feature resolution."""
        return self.layers(features)
