"""Training methods, one file each; their records (class, `Config`, needs) are in `trainers.registry.METHOD_REGISTRY`.

A method is a `trainers.methods.base.Method`: built as `METHODS[name](backbone, **options)` (the options are its
`Config`'s fields, validated there), it implements `training_step(views, batch, ctx) -> StepOutput`, and may give
`param_groups`, `momentum_pairs` (EMA targets the engine moves) and hooks; `.backbone` is the encoder evaluation
uses. Adding one: a file here with the module and its `Config` (the paper's defaults, the paper cited), a record in
`trainers.registry`, its tests (and an entry in tests/trainers/method_helpers.SMALL_OPTIONS: the contract tests
then cover it).

Usage::

    from trainers.methods import METHODS
    method = METHODS["byol"](build_backbone("resnet18", 32), base_momentum=0.996)
    out = train_step(method, method, optimizer, views, batch, ctx)     # trainers.engine.step

`METHODS` (name -> class) is a read-only view of the registry.
"""

from __future__ import annotations

from typing import Any

from trainers.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig, barlow_twins_loss
from trainers.methods.byol import BYOL, BYOLConfig, byol_loss
from trainers.methods.dino import DINO, DINOConfig, dino_loss
from trainers.methods.moco_v2 import MoCoV2, MoCoV2Config, moco_infonce_loss
from trainers.methods.moco_v2_plus import MoCoV2Plus, MoCoV2PlusConfig
from trainers.methods.simclr import SimCLR, SimCLRConfig, nt_xent_loss
from trainers.methods.simsiam import SimSiam, SimSiamConfig, simsiam_loss
from trainers.methods.supervised import Supervised, SupervisedConfig, supervised_loss
from trainers.methods.swav import SwAV, SwAVConfig, sinkhorn_knopp, swapped_prediction, swav_loss
from trainers.methods.us3l import US3L, US3LConfig


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # resolved lazily: trainers.registry imports this package
        from trainers.registry import METHOD_REGISTRY

        return METHOD_REGISTRY.builders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["US3L", "US3LConfig", "BYOL", "BYOLConfig", "BarlowTwins", "BarlowTwinsConfig", "DINO", "DINOConfig", "METHODS", "MoCoV2",
    "MoCoV2Config", "MoCoV2Plus", "MoCoV2PlusConfig", "SimCLR", "SimCLRConfig", "SimSiam", "SimSiamConfig",
    "Supervised", "SupervisedConfig", "SwAV", "SwAVConfig", "barlow_twins_loss", "byol_loss", "dino_loss",
    "moco_infonce_loss", "nt_xent_loss", "simsiam_loss", "sinkhorn_knopp", "supervised_loss", "swapped_prediction",
    "swav_loss"]
