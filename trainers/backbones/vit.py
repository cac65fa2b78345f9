"""ViT-Tiny encoder (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"; the Tiny size from Touvron et al.,
2021, DeiT): width 192, depth 12, 3 heads, MLP 768, a class token, learned position embeddings.

Built by torchvision's `VisionTransformer` (its patch embedding, class token, position embeddings, encoder blocks
and final LayerNorm; the classification head is dropped). `forward` returns the final class token, `[B, 192]`.

Patch size: 16 at 224 px, as in the paper; small images need smaller patches to keep enough tokens, so unless
`patch_size` is given it is chosen from the image side: 16 at >= 224 px, 8 at >= 64 px (64 px -> 8x8 tokens,
128 px -> 16x16), 4 below (32 px -> 8x8 tokens). The patch must divide every image side the encoder sees
(`ViTConfig.check`; the spec checks it against the data and view sizes before Ray starts).

Other sizes than the one it was built for: torchvision's forward only accepts that size; this one interpolates
the position-embedding grid (bicubic, as DINO does for its local crops), so a model built at the data's image
size also takes views of another size (a multiple of the patch).

`forward_stages` returns the patch tokens after blocks 3, 6, 9 and 12 as maps `[B, 192, H / p, W / p]` (the last
after the final LayerNorm), the usual taps of a plain ViT for dense heads.

Usage::

    from trainers.backbones.vit import vit_tiny
    net = vit_tiny(image_size=32)            # patch 4: 64 tokens + the class token
    feats = net(images)                      # [B, 192]
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from trainers.backbones.base import BackboneConfig, NormLayer, check_image_size, check_images

TINY = {"num_layers": 12, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768}
STAGE_BLOCKS = (3, 6, 9, 12)  # 1-based blocks whose outputs `forward_stages` returns


def default_patch_size(image_size: int) -> int:
    """16 at >= 224 px, 8 at >= 64 px, 4 below."""
    if image_size >= 224:
        return 16
    return 8 if image_size >= 64 else 4


class ViTConfig(BackboneConfig):
    """The options `build_backbone` takes for ViT-Tiny (the spec's `backbone:` section besides `name`)."""

    patch_size: int | None = Field(
        None, ge=1, le=64,
        description="side of the square patches; must divide the image and view sides; "
                    "None: 16 at >= 224 px, 8 at >= 64 px, 4 below",
    )

    def resolve(self, image_size: int) -> dict[str, Any]:
        self.check(image_size)
        return {"image_size": image_size, "patch_size": self.patch_size or default_patch_size(image_size)}

    def check(self, image_size: int, *other_sizes: int) -> None:
        patch = self.patch_size or default_patch_size(image_size)
        hint = "" if self.patch_size else f"; {patch} is the default at {image_size} px, set one that divides"
        for size in (image_size, *other_sizes):
            if size % patch:
                raise ValueError(f"patch_size: {patch} does not divide the image side {size} px{hint}")


class ViT(nn.Module):
    """torchvision's VisionTransformer without its head; any input side that the patch divides.

    Args:
        image_size: side the position embeddings are made for (other multiples of the patch are interpolated).
        patch_size: side of the patches; must divide `image_size`.
        num_layers, num_heads, hidden_dim, mlp_dim: the transformer's size (ViT-Tiny's by default).
        norm_layer: factory `dim -> module` for the LayerNorms (torchvision's `LayerNorm(eps=1e-6)` by default).

    Attributes:
        out_dim: size of the feature vector (`hidden_dim`).
        stage_dims: channels of the maps `forward_stages` returns.
    """

    def __init__(
        self, image_size: int, patch_size: int, num_layers: int = 12, num_heads: int = 3, hidden_dim: int = 192,
        mlp_dim: int = 768, norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        ViTConfig.parse("ViT", patch_size=patch_size).check(image_size)
        net = TorchvisionViT(
            image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
            hidden_dim=hidden_dim, mlp_dim=mlp_dim, norm_layer=norm_layer or partial(nn.LayerNorm, eps=1e-6),
        )
        self.conv_proj, self.class_token, self.encoder = net.conv_proj, net.class_token, net.encoder
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.out_dim: int = hidden_dim
        # 0-based indices of the tapped blocks; the last block is always one (its map follows the final LayerNorm).
        self._taps = {b - 1 for b in STAGE_BLOCKS if b <= num_layers} | {num_layers - 1}
        self.stage_dims: tuple[int, ...] = (hidden_dim,) * len(self._taps)

    def _position_embedding(self, rows: int, cols: int) -> Tensor:
        pos = self.encoder.pos_embedding
        if (rows, cols) == (self.grid, self.grid):
            return pos
        cls_pos, grid = pos[:, :1], pos[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)

    def _tokens(self, x: Tensor) -> tuple[Tensor, int, int]:
        check_images(x)
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image sides {h}x{w} must be multiples of the patch size {self.patch_size}")
        x = self.conv_proj(x)  # [B, D, h / p, w / p]
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder.dropout(x + self._position_embedding(rows, cols)), rows, cols

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Float images `[B, 3, H, W]` -> patch tokens after blocks 3, 6, 9, 12 as `[B, D, H / p, W / p]` maps."""
        x, rows, cols = self._tokens(x)
        maps = []
        last = len(self.encoder.layers) - 1
        for index, block in enumerate(self.encoder.layers):
            x = block(x)
            if index in self._taps:
                out = self.encoder.ln(x) if index == last else x
                maps.append(out[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, rows, cols))
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """Float images `[B, 3, H, W]` -> the final class token `[B, out_dim]`."""
        x, _, _ = self._tokens(x)
        return self.encoder.ln(self.encoder.layers(x))[:, 0]


def vit_tiny(image_size: int = 224, patch_size: int | None = None, norm_layer: NormLayer | None = None) -> ViT:
    """ViT-Tiny at `image_size` (patch from the size unless given); `out_dim = 192`, 5.5 M parameters at 224/16."""
    return ViT(image_size, patch_size or default_patch_size(image_size), norm_layer=norm_layer, **TINY)


__all__ = ["TINY", "ViT", "ViTConfig", "default_patch_size", "vit_tiny"]
