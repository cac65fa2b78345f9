"""Heads the methods share: projector / predictor MLPs and frozen target copies.

    projector = mlp(in_dim, 2048, 128)                       # Linear-BN-ReLU-Linear (SimCLR v2, BYOL)
    projector = mlp(in_dim, 8192, 8192, layers=3, last_bn=True, last_affine=False)   # Barlow Twins
    target = frozen_copy(projector)                          # requires_grad False; moved by the engine's EMA
"""

from __future__ import annotations

import copy

from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, last_bn: bool = False,
        last_affine: bool = True, hidden_bn: bool = True, bias: bool | None = None) -> nn.Sequential:
    """`layers` Linear layers with BN + ReLU between them; optionally a BN after the last (Barlow Twins, SimSiam).

    The hidden Linear layers have no bias when a BN follows them (the BN's shift replaces it).
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden, bias=not hidden_bn if bias is None else bias)]
        if hidden_bn:
            modules.append(nn.BatchNorm1d(hidden))
        modules.append(nn.ReLU(inplace=True))
        width = hidden
    modules.append(nn.Linear(width, out_dim, bias=not last_bn if bias is None else bias))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=last_affine))
    return nn.Sequential(*modules)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen: a target network the optimizer never sees."""
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


__all__ = ["frozen_copy", "mlp"]
