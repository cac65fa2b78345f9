"""Self-supervised methods; their records (class, `Config`, needs) are in `trainers.registry.METHOD_REGISTRY`.

A method is an `nn.Module` built as `METHODS[name](backbone, **options)`, the options being its `Config`'s
fields; `forward(views)` returns `{"loss": scalar, "per_sample": [B]}`; `momentum_update(progress)` runs after
every optimizer step; `.backbone` is the encoder that evaluation uses. Adding one: a file here with the module and
its `Config` (defaults with the paper's values, the paper cited), a record in `trainers.registry`, its tests.

Usage::

    from trainers.methods import METHODS
    method = METHODS["byol"](build_backbone("resnet18", 32), base_momentum=0.996)

`METHODS` (name -> class) is a read-only view of the registry, kept for existing callers.
"""

from __future__ import annotations

from typing import Any

from trainers.methods.byol import BYOL, BYOLConfig, byol_loss
from trainers.methods.dino import DINO, DINOConfig, dino_loss
from trainers.methods.moco_v2 import MoCoV2, MoCoV2Config, moco_infonce_loss
from trainers.methods.moco_v2_plus import MoCoV2Plus, MoCoV2PlusConfig
from trainers.methods.simclr import SimCLR, SimCLRConfig, nt_xent_loss
from trainers.methods.swav import SwAV, SwAVConfig, sinkhorn_knopp, swapped_prediction, swav_loss


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import METHOD_REGISTRY

        return METHOD_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BYOL", "BYOLConfig", "DINO", "DINOConfig", "METHODS", "MoCoV2", "MoCoV2Config", "MoCoV2Plus",
    "MoCoV2PlusConfig", "SimCLR", "SimCLRConfig", "SwAV", "SwAVConfig", "byol_loss", "dino_loss",
    "moco_infonce_loss", "nt_xent_loss", "sinkhorn_knopp", "swapped_prediction", "swav_loss"]
