"""The smallest spec that trains, evaluates and logs for real (16 px, width-8 ResNet-18, SimCLR, 2 DDP workers):
what the integration, fault and cluster tests start from.

    spec = tiny_spec("worker-death", synthetic_url, optim={"epochs_per_chunk": 8},
                     resources={"checkpoint_every_steps": 4})

Each keyword replaces or extends the top-level section of that name (dicts are merged one level deep).
"""

from __future__ import annotations

import copy
from typing import Any


def tiny_spec(name: str, data_url: str, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "data": {"url": data_url, "image_size": 16},
        "stream": {"kind": "instance", "chunks": 2, "seed": 0},
        "lines": {"method": ["simclr"], "strategy": ["sequential"]},
        "backbone": {"width": 8, "cifar_stem": False},
        "methods": {"simclr": {"proj_hidden": 64}},
        "optim": {"lr": 0.1, "epochs_per_chunk": 2, "batch_size": 32},
        "eval": {"linear": {"epochs": 5}, "baseline": False},
        "resources": {"workers": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **copy.deepcopy(value)}
        else:
            spec[key] = copy.deepcopy(value)
    return spec
