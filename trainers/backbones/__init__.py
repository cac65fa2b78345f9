"""Encoders, by name; their records (builder, `Config`, needs) are in `trainers.registry.BACKBONE_REGISTRY`.

Usage::

    from trainers.backbones import build_backbone
    net = build_backbone("resnet18", image_size=32, width=32)   # CIFAR stem chosen for 32 px images
    net.out_dim                                                  # 256

`BACKBONES` (name -> builder) is a read-only view of that registry, kept for existing callers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trainers.backbones.resnet import ResNet, ResNetConfig, resnet18, resnet50

# At or below this side a 7x7 stride-2 stem plus max-pool throws away too much resolution (32 px -> 8 px).
CIFAR_STEM_MAX_SIZE = 64

_DEFAULTS = ResNetConfig()


def build_backbone(
    name: str, image_size: int, width: int = _DEFAULTS.width, cifar_stem: bool | None = _DEFAULTS.cifar_stem
) -> nn.Module:
    """Build the encoder `name` for square images of side `image_size`.

    Args:
        name: a name in `trainers.registry.BACKBONE_REGISTRY`.
        image_size: side of the images the encoder will see (after augmentation); picks the stem.
        width, cifar_stem: the backbone's options, validated by its record's `Config` (`ResNetConfig`);
            cifar_stem None -> True when `image_size <= 64`.

    Returns:
        A module with `.out_dim`; forward float `[B, 3, H, W]` -> `[B, out_dim]`.
    """
    from trainers.registry import BACKBONE_REGISTRY

    record = BACKBONE_REGISTRY.require(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    options = record.options({"width": width, "cifar_stem": cifar_stem})
    if options["cifar_stem"] is None:
        options["cifar_stem"] = image_size <= CIFAR_STEM_MAX_SIZE
    return record.build(**options)


def __getattr__(name: str) -> Any:
    if name == "BACKBONES":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import BACKBONE_REGISTRY

        return BACKBONE_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKBONES", "CIFAR_STEM_MAX_SIZE", "ResNet", "ResNetConfig", "build_backbone", "resnet18", "resnet50",
]
