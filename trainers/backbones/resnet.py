"""ResNet-18/34/50 encoders for self-supervised pre-training (He et al., 2016, "Deep Residual Learning").

The residual blocks are torchvision's (`BasicBlock`, and `Bottleneck` with the stride on its 3x3 convolution,
"ResNet v1.5"); what torchvision's `ResNet` class lacks, and is written here, is:

- `width`: channels of the first stage (64 in the paper; torchvision fixes it). Stages have width, 2w, 4w, 8w
  channels, times 4 at the output of Bottleneck blocks, so `out_dim = 8 * width * block.expansion`. Width 16 or
  32 keeps CPU runs small.
- `cifar_stem`: a 3x3 stride-1 convolution without max-pool, as in SimCLR's CIFAR-10 experiments; the ImageNet
  stem (7x7 stride-2 convolution then a stride-2 max-pool) shrinks a 32 px image to 8 px before the first block.
- no classifier: `forward` returns the globally pooled features `[B, out_dim]`; `forward_stages` the four stage maps.

At width 64 with the ImageNet stem the trunk is torchvision's network layer for layer (same parameters in the
same order; only the stem's names differ: `stem.0` / `stem.1` for `conv1` / `bn1`).

Usage::

    from trainers.backbones.resnet import resnet18
    net = resnet18(width=32, cifar_stem=True)
    feats = net(images.to(memory_format=torch.channels_last))   # [B, 256]
    c2, c3, c4, c5 = net.forward_stages(images)                 # strides 1, 2, 4, 8 with the CIFAR stem
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from trainers.backbones.base import CIFAR_STEM_MAX_SIZE, BackboneConfig, NormLayer, check_images


class ResNetConfig(BackboneConfig):
    """The options `build_backbone` takes for a ResNet (the spec's `backbone:` section besides `name`)."""

    width: int = Field(
        64, ge=4, le=256,
        description="channels of the first stage (64 is the paper's network; 16 or 32 keep CPU runs small)",
    )
    cifar_stem: bool | None = Field(
        None,
        description="3x3 stride-1 stem without max-pool (SimCLR's CIFAR-10 setting) instead of the ImageNet stem; "
                    f"None: on when the image side is <= {CIFAR_STEM_MAX_SIZE} px",
    )


def residual_norm(block: nn.Module) -> nn.Module:
    """The norm closing a block's residual branch (zeroed so that the block starts as the identity)."""
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global average pooling; no classifier.

    Args:
        block: torchvision's `BasicBlock` or `Bottleneck`.
        layers: blocks per stage, e.g. `(2, 2, 2, 2)` for ResNet-18.
        width: channels of the first stage (> 0).
        cifar_stem: 3x3 stride-1 stem without max-pool (small images) instead of 7x7 stride-2 plus max-pool.
        zero_init_residual: start each residual branch at zero (last norm's gamma = 0), so every block begins as
            the identity; Goyal et al. 2017 found this helps large-batch training, which SSL relies on.
        norm_layer: factory `channels -> module` for every normalisation layer; `nn.BatchNorm2d` by default.

    Attributes:
        out_dim: size of the feature vector `forward` returns.
        stage_dims: channels of the four maps `forward_stages` returns.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        width: int = 64,
        cifar_stem: bool = False,
        zero_init_residual: bool = True,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        norm = norm_layer or nn.BatchNorm2d
        self.width = width
        self.cifar_stem = cifar_stem
        if cifar_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), norm(width), nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), norm(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        in_channels = width
        stages = []
        for index, count in enumerate(layers):
            channels = width * 2**index
            stride = 1 if index == 0 else 2
            out_channels = channels * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels),
                )
            stage = [block(in_channels, channels, stride, downsample, norm_layer=norm)]
            stage += [block(out_channels, channels, norm_layer=norm) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.stage_dims: tuple[int, ...] = tuple(width * 2**i * block.expansion for i in range(4))
        self.out_dim: int = in_channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and getattr(residual_norm(m), "weight", None) is not None:
                    nn.init.zeros_(residual_norm(m).weight)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Float images `[B, 3, H, W]` -> the outputs of the four stages, `[B, stage_dims[i], H_i, W_i]`.

        With the ImageNet stem they are at strides 4, 8, 16, 32; with the CIFAR stem at 1, 2, 4, 8.
        """
        check_images(x)
        x = self.stem(x)
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """Float images `[B, 3, H, W]` (contiguous or channels_last) -> features `[B, out_dim]`."""
        return torch.flatten(self.pool(self.forward_stages(x)[-1]), 1)


def resnet18(width: int = 64, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2); `out_dim = 8 * width` (512 at width 64, 11.2 M parameters)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), width=width, cifar_stem=cifar_stem, norm_layer=norm_layer)


def resnet34(width: int = 64, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-34: BasicBlocks (3, 4, 6, 3); `out_dim = 8 * width` (512 at width 64, 21.3 M parameters)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), width=width, cifar_stem=cifar_stem, norm_layer=norm_layer)


def resnet50(width: int = 64, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3); `out_dim = 32 * width` (2048 at width 64, 23.5 M parameters)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width=width, cifar_stem=cifar_stem, norm_layer=norm_layer)


__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNetConfig", "residual_norm", "resnet18", "resnet34", "resnet50"]
