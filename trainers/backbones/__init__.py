"""Encoders, by name; their records (builder, `Config`, needs) are in `trainers.registry.BACKBONE_REGISTRY`.

Usage::

    from trainers.backbones import build_backbone
    net = build_backbone("resnet18", image_size=32, width=32)   # CIFAR stem chosen for 32 px images
    net.out_dim                                                  # 256
    maps = net.forward_stages(images)                            # four [B, C, h, w] maps, shallow to deep
    vit = build_backbone("vit_tiny", image_size=32)              # patch 4 chosen for 32 px images

Families: `resnet` (resnet18, resnet34, resnet50), `mobilenet` (mobilenet_v2), `vit` (vit_tiny), and their
universally slimmable variants in `slimmable` (slimmable_resnet18/50, slimmable_mobilenet_v2, slimmable_vit_tiny:
width set at forward time, `set_width`, `recalibrate_bn`, `width_cost`); the contract
they share (`out_dim`, `forward`, `forward_stages`, norm factories) is described in `trainers.backbones.base`.
`BACKBONES` (name -> builder) is a read-only view of the registry, kept for existing callers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trainers.backbones.base import CIFAR_STEM_MAX_SIZE, BackboneConfig, NormLayer, check_image_size
from trainers.backbones.mobilenet import MobileNetV2, MobileNetV2Config, mobilenet_v2
from trainers.backbones.resnet import ResNet, ResNetConfig, resnet18, resnet34, resnet50
from trainers.backbones.slimmable import (
    recalibrate_bn,
    set_width,
    slimmable_mobilenet_v2,
    slimmable_resnet18,
    slimmable_resnet50,
    slimmable_vit_tiny,
    width_cost,
)
from trainers.backbones.vit import ViT, ViTConfig, vit_tiny


def build_backbone(name: str, image_size: int, *, norm_layer: NormLayer | None = None, **options: Any) -> nn.Module:
    """Build the encoder `name` for square images of side `image_size`.

    Args:
        name: a name in `trainers.registry.BACKBONE_REGISTRY`.
        image_size: side of the images the encoder will see; fills the size-dependent defaults (the ResNet and
            MobileNetV2 stems, the ViT patch) and must suit the options (a ViT patch must divide it).
        norm_layer: factory `channels -> module` for the normalisation layers (None: the family's default).
        options: the backbone's options, validated by its record's `Config` (e.g. `width`, `cifar_stem` for a
            ResNet; `width_mult` for MobileNetV2; `patch_size` for ViT-Tiny); omitted ones take their defaults.

    Returns:
        A module with `.out_dim`, `.stage_dims` and `forward_stages`; forward float `[B, 3, H, W]` -> `[B, out_dim]`.

    Raises:
        ValueError: an unknown name, a bad `image_size`, or an option that is unknown, mistyped or cannot work at
            `image_size` (the message names it).
    """
    from trainers.registry import BACKBONE_REGISTRY

    record = BACKBONE_REGISTRY.require(name)
    check_image_size(image_size)
    config = record.config.parse(record.name, **options)
    try:
        kwargs = config.resolve(image_size)
    except ValueError as exc:
        raise ValueError(f"{record.name}: {exc}") from None
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    return record.build(**kwargs)


def __getattr__(name: str) -> Any:
    if name == "BACKBONES":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import BACKBONE_REGISTRY

        return BACKBONE_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKBONES", "CIFAR_STEM_MAX_SIZE", "BackboneConfig", "MobileNetV2", "MobileNetV2Config", "NormLayer", "ResNet",
    "ResNetConfig", "ViT", "ViTConfig", "build_backbone", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
    "vit_tiny", "recalibrate_bn", "set_width", "slimmable_mobilenet_v2", "slimmable_resnet18", "slimmable_resnet50",
    "slimmable_vit_tiny", "width_cost",
]
