"""Self-supervised methods, by name: `METHODS` is the whole registry.

A method is an `nn.Module` built as `METHODS[name](backbone, **hparams)`; `forward(views)` returns
`{"loss": scalar, "per_sample": [B]}`; `momentum_update(progress)` runs after every optimizer step;
`.backbone` is the encoder that evaluation uses. Adding one: a file here, an entry below, its tests.

Usage::

    from trainers.methods import METHODS
    method = METHODS["byol"](build_backbone("resnet18", 32), base_momentum=0.996)
"""

from __future__ import annotations

from trainers.methods.byol import BYOL, byol_loss
from trainers.methods.simclr import SimCLR, nt_xent_loss

METHODS = {"simclr": SimCLR, "byol": BYOL}

__all__ = ["BYOL", "METHODS", "SimCLR", "byol_loss", "nt_xent_loss"]
