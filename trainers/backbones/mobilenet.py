"""MobileNetV2 encoder (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

Built by torchvision's `MobileNetV2` (its width multiplier, its norm-layer factory); the classifier is dropped,
so `forward` returns the globally pooled output of the last 1x1 convolution, `[B, out_dim]` with
`out_dim = 1280` for `width_mult <= 1` (torchvision's rule: the last layer never narrows, it widens above 1).

Small images: the network has stride 32, so a 32 px image ends at 1x1. `cifar_stem` (on by default at or below
64 px, like the ResNets) sets the first convolution and the first stride-2 bottleneck stage (24 channels) to
stride 1, the usual CIFAR adaptation: stride 8, a 32 px image ends at 4x4. Only strides change, never weights:
the parameters are torchvision's for either stem.

`forward_stages` returns the ends of the four stride groups: 24, 32, 96 channels and the last layer (strides
4, 8, 16, 32 with the ImageNet stem; 1, 2, 4, 8 with the CIFAR one).

Usage::

    from trainers.backbones.mobilenet import mobilenet_v2
    net = mobilenet_v2(width_mult=0.5, cifar_stem=True)
    feats = net(images)                                          # [B, 1280]
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import MobileNetV2 as TorchvisionMobileNetV2
from torchvision.models.mobilenetv2 import _make_divisible

from trainers.backbones.base import CIFAR_STEM_MAX_SIZE, BackboneConfig, NormLayer, check_images

# torchvision's table: expansion t, channels c, repeats n, stride s of the first block of each group.
_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
# Indices into `features` after which each stride group ends (24, 32, 96 channels, and the last 1x1 layer).
STAGE_ENDS = (3, 6, 13, 18)
_STAGE_CHANNELS = (24, 32, 96)
_LAST_CHANNEL = 1280


class MobileNetV2Config(BackboneConfig):
    """The options `build_backbone` takes for MobileNetV2 (the spec's `backbone:` section besides `name`)."""

    width_mult: float = Field(
        1.0, ge=0.25, le=2.0, allow_inf_nan=False,
        description="multiplies every layer's channels (rounded to multiples of 8); 1.0 is the paper's network",
    )
    cifar_stem: bool | None = Field(
        None,
        description="stride 1 for the first convolution and the first stride-2 stage (network stride 8 instead of "
                    f"32); None: on when the image side is <= {CIFAR_STEM_MAX_SIZE} px",
    )


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 feature extractor with global average pooling; no classifier.

    Args:
        width_mult: channel multiplier (> 0).
        cifar_stem: network stride 8 instead of 32 (see the module docstring).
        norm_layer: factory `channels -> module` for every normalisation layer; `nn.BatchNorm2d` by default.

    Attributes:
        features: torchvision's `features` (same names, so torchvision's weights load into it).
        out_dim: size of the feature vector `forward` returns.
        stage_dims: channels of the four maps `forward_stages` returns.
    """

    def __init__(self, width_mult: float = 1.0, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        setting = [list(row) for row in _SETTING]
        if cifar_stem:
            setting[1][3] = 1
        net = TorchvisionMobileNetV2(width_mult=float(width_mult), inverted_residual_setting=setting,
                                     norm_layer=norm_layer)
        if cifar_stem:
            net.features[0][0].stride = (1, 1)  # torchvision fixes the stem's stride at 2
        self.features = net.features
        self.width_mult = float(width_mult)
        self.cifar_stem = cifar_stem
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = net.last_channel
        self.stage_dims: tuple[int, ...] = (
            *(_make_divisible(c * self.width_mult, 8) for c in _STAGE_CHANNELS), net.last_channel,
        )

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Float images `[B, 3, H, W]` -> the ends of the four stride groups, `[B, stage_dims[i], H_i, W_i]`."""
        check_images(x)
        maps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in STAGE_ENDS:
                maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """Float images `[B, 3, H, W]` (contiguous or channels_last) -> features `[B, out_dim]`."""
        check_images(x)
        return torch.flatten(self.pool(self.features(x)), 1)


def mobilenet_v2(width_mult: float = 1.0, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> MobileNetV2:
    """MobileNetV2; `out_dim = 1280 * max(1, width_mult)` (rounded to 8); 2.2 M parameters at width 1."""
    return MobileNetV2(width_mult=width_mult, cifar_stem=cifar_stem, norm_layer=norm_layer)


__all__ = ["STAGE_ENDS", "MobileNetV2", "MobileNetV2Config", "mobilenet_v2"]
