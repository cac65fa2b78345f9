"""Encoders, by name: `BACKBONES` is the whole registry.

Usage::

    from trainers.backbones import build_backbone
    net = build_backbone("resnet18", image_size=32, width=32)   # CIFAR stem chosen for 32 px images
    net.out_dim                                                  # 256
"""

from __future__ import annotations

from torch import nn

from trainers.backbones.resnet import ResNet, resnet18, resnet50

BACKBONES = {"resnet18": resnet18, "resnet50": resnet50}

# At or below this side a 7x7 stride-2 stem plus max-pool throws away too much resolution (32 px -> 8 px).
CIFAR_STEM_MAX_SIZE = 64


def build_backbone(name: str, image_size: int, width: int = 64, cifar_stem: bool | None = None) -> nn.Module:
    """Build the encoder `name` for square images of side `image_size`.

    Args:
        name: a key of `BACKBONES`.
        image_size: side of the images the encoder will see (after augmentation); picks the stem.
        width: channels of the first stage (64 = the paper's network).
        cifar_stem: None -> True when `image_size <= 64`.

    Returns:
        A module with `.out_dim`; forward float `[B, 3, H, W]` -> `[B, out_dim]`.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if cifar_stem is None:
        cifar_stem = image_size <= CIFAR_STEM_MAX_SIZE
    return BACKBONES[name](width=width, cifar_stem=cifar_stem)


__all__ = ["BACKBONES", "CIFAR_STEM_MAX_SIZE", "ResNet", "build_backbone", "resnet18", "resnet50"]
