"""What every encoder shares: its options' base class, the norm-layer factory type, the small-image threshold.

Each backbone family declares a `BackboneConfig` subclass. Besides validating the spec's `backbone:` options (like
every `ComponentConfig`), it knows how the image size fills in the size-dependent defaults (`resolve`) and which
sizes it cannot work at (`check`): the spec calls `check` before Ray starts, `build_backbone` calls `resolve`.

Every encoder module follows one contract:

- `out_dim`: length of the pooled feature vector;
- `forward(x)`: float `[B, 3, H, W]` -> `[B, out_dim]`;
- `forward_stages(x)`: a list of feature maps `[B, C_i, H_i, W_i]`, shallow to deep (for dense heads such as
  detection); `stage_dims` lists their `C_i`.

A norm factory (`NormLayer`) is a callable `channels -> nn.Module` (`nn.BatchNorm2d` by default); ResNet and
MobileNetV2 create every normalisation layer through it, so a slimmable or frozen variant can be passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trainers.config import ComponentConfig

# At or below this side the ImageNet stems (stride 2 convolution, then for ResNet a stride-2 max-pool) throw away
# too much resolution: a 32 px image would reach the first residual stage at 8 px.
CIFAR_STEM_MAX_SIZE = 64

NormLayer = Callable[[int], nn.Module]


class BackboneConfig(ComponentConfig):
    """A backbone's options (the spec's `backbone:` section besides `name`)."""

    def resolve(self, image_size: int) -> dict[str, Any]:
        """Keyword arguments for the builder at `image_size`, size-dependent defaults (None) filled in.

        Raises:
            ValueError: starting with the option's name, when the options cannot work at `image_size`.
        """
        options = self.model_dump()
        # The CNNs' `cifar_stem: None` means "decide from the image size": small images keep their resolution.
        if "cifar_stem" in options and options["cifar_stem"] is None:
            options["cifar_stem"] = image_size <= CIFAR_STEM_MAX_SIZE
        return options

    def check(self, image_size: int, *other_sizes: int) -> None:
        """Raise a ValueError naming the option when the backbone built for `image_size` cannot also take
        `other_sizes` (the spec passes the view size; the evaluation feeds `image_size` itself)."""
        self.resolve(image_size)


def check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def check_images(x: Any) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")


__all__ = ["BackboneConfig", "CIFAR_STEM_MAX_SIZE", "NormLayer", "check_image_size", "check_images"]
