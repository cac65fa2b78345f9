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

from trainers.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig, barlow_twins_loss
from trainers.methods.byol import BYOL, BYOLConfig, byol_loss
from trainers.methods.simclr import SimCLR, SimCLRConfig, nt_xent_loss
from trainers.methods.simsiam import SimSiam, SimSiamConfig, simsiam_loss
from trainers.methods.supervised import Supervised, SupervisedConfig, supervised_loss


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import METHOD_REGISTRY

        return METHOD_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BYOL", "BYOLConfig", "BarlowTwins", "BarlowTwinsConfig", "METHODS", "SimCLR", "SimCLRConfig", "SimSiam",
           "SimSiamConfig", "Supervised", "SupervisedConfig", "barlow_twins_loss", "byol_loss", "nt_xent_loss",
           "simsiam_loss", "supervised_loss"]
