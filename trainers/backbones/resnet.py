"""ResNet-18 / ResNet-50 encoders for self-supervised pre-training (He et al., 2016, "Deep Residual Learning").

The classifier is left out: `forward` returns the globally pooled features `[B, out_dim]`, which the SSL
method's projector and the evaluators consume. Two knobs matter for this project:

- `width`: channels of the first stage (64 in the paper). Stages have width, 2w, 4w, 8w channels, times 4 at
  the output of Bottleneck blocks, so `out_dim = 8 * width * block.expansion`. Width 16 or 32 keeps CPU runs small.
- `cifar_stem`: a 3x3 stride-1 convolution without max-pool, as in SimCLR's CIFAR-10 experiments; the ImageNet
  stem (7x7 stride-2 convolution then a stride-2 max-pool) shrinks a 32 px image to 8 px before the first block.

Usage::

    from trainers.backbones.resnet import resnet18
    net = resnet18(width=32, cifar_stem=True)
    feats = net(images.to(memory_format=torch.channels_last))   # [B, 256]
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from trainers.config import ComponentConfig


class ResNetConfig(ComponentConfig):
    """The options `build_backbone` takes for a ResNet (the spec's `backbone:` section besides `name`)."""

    width: int = Field(
        64, ge=4, le=256,
        description="channels of the first stage (64 is the paper's network; 16 or 32 keep CPU runs small)",
    )
    cifar_stem: bool | None = Field(
        None,
        description="3x3 stride-1 stem without max-pool (SimCLR's CIFAR-10 setting) instead of the ImageNet stem; "
                    "None: on when the image side is <= 64 px",
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """`[B, in_channels, H, W]` -> `[B, channels, H / stride, W / stride]`."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "ResNet v1.5"), 1x1 expand by 4; ResNet-50+."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """`[B, in_channels, H, W]` -> `[B, 4 * channels, H / stride, W / stride]`."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global average pooling; no classifier.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: blocks per stage, e.g. `(2, 2, 2, 2)` for ResNet-18.
        width: channels of the first stage (> 0).
        cifar_stem: 3x3 stride-1 stem without max-pool (small images) instead of 7x7 stride-2 plus max-pool.
        zero_init_residual: start each residual branch at zero (last BN gamma = 0), so every block begins as
            the identity; Goyal et al. 2017 found this helps large-batch training, which SSL relies on.

    Attributes:
        out_dim: size of the feature vector `forward` returns.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        width: int = 64,
        cifar_stem: bool = False,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        self.width = width
        self.cifar_stem = cifar_stem
        if cifar_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        in_channels = width
        stages = []
        for index, blocks in enumerate(layers):
            channels = width * 2**index
            stride = 1 if index == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(in_channels, channels, stride if b == 0 else 1))
                in_channels = channels * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = in_channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Float images `[B, 3, H, W]` (contiguous or channels_last) -> features `[B, out_dim]`."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def resnet18(width: int = 64, cifar_stem: bool = False) -> ResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2); `out_dim = 8 * width` (512 at width 64, 11.2 M parameters)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), width=width, cifar_stem=cifar_stem)


def resnet50(width: int = 64, cifar_stem: bool = False) -> ResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3); `out_dim = 32 * width` (2048 at width 64, 23.5 M parameters)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width=width, cifar_stem=cifar_stem)
