"""Optimisers of the training engine: SGD, AdamW and LARS over parameter groups, and the LR scaling rule.

    groups = param_groups(model, weight_decay=1e-6)            # decay group + no-decay group (biases, norms)
    optimizer = build_optimizer("lars", groups, lr=scaled_lr(0.3, 4096, "linear"), momentum=0.9,
                                weight_decay=1e-6, eeta=0.001)

Parameter groups are plain dicts in torch's format with a few extra keys the engine understands:

- `weight_decay`: overrides the optimiser's (the no-decay group sets 0);
- `lars_exclude`: LARS applies no trust ratio to the group (plain momentum SGD on it);
- `fixed_lr`: the schedule leaves the group's `lr` alone (SimSiam's predictor keeps its LR);
- `lr_scale`: the schedule sets the group's LR to `lr_scale x` the scheduled value (default 1).

A method may supply its own groups built the same way; `param_groups` is what the engine uses otherwise.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw", "lars")
LR_SCALING = ("none", "linear")

# Modules whose parameters are a normalisation's scale and shift: never decayed, never LARS-adapted.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def param_groups(
    module: nn.Module, weight_decay: float, exclude_norm_and_bias: bool = True
) -> list[dict[str, Any]]:
    """Split `module`'s trainable parameters into a decayed group and an excluded one.

    The excluded group holds every bias and every parameter of a normalisation layer (`NORM_LAYERS`); it gets
    `weight_decay` 0 and `lars_exclude` True. Frozen parameters (requires_grad False, e.g. an EMA target) are left
    out; a parameter shared by several modules appears once. With `exclude_norm_and_bias` False everything is in
    the first group. Empty groups are kept so the layout is always [decay, no_decay].
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            excluded = exclude_norm_and_bias and (isinstance(sub, NORM_LAYERS) or name == "bias")
            (no_decay if excluded else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def scaled_lr(lr: float, global_batch: int, rule: str = "none") -> float:
    """The peak LR: `lr` as given (`none`) or `lr x global_batch / 256` (`linear`, Goyal et al. 2017)."""
    if rule == "none":
        return lr
    if rule == "linear":
        if global_batch < 1:
            raise ValueError(f"lr_scaling 'linear' needs the global batch size, got {global_batch}")
        return lr * global_batch / 256
    raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {rule!r}")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman and Ginsburg 2017, "Large Batch Training of Convolutional
    Networks", Algorithm 1), as used by SimCLR, BYOL and Barlow Twins.

    For every parameter `w` with gradient `g` of a group without `lars_exclude`:

        trust = eeta * ||w|| / (||g|| + weight_decay * ||w||)      (1 when that is 0/0 or ||w|| is 0)
        v     = momentum * v + lr * trust * (g + weight_decay * w)
        w     = w - v

    Groups with `lars_exclude` get `v = momentum * v + lr * (g + weight_decay * w)` (no trust ratio; the default
    no-decay group also has weight_decay 0). As in the paper the LR sits inside the momentum buffer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eeta: float = 0.001,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if eeta <= 0:
            raise ValueError(f"LARS: eeta (trust coefficient) must be > 0, got {eeta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eeta=eeta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                update = grad.add(p, alpha=wd) if wd != 0 else grad.clone()
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    denominator = g_norm + wd * w_norm
                    usable = (w_norm > 0) & (denominator > 0)
                    trust = torch.where(usable, group["eeta"] * w_norm / denominator.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    update.mul_(trust)
                update.mul_(lr)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update
                else:
                    buf.mul_(momentum).add_(update)
                p.sub_(buf)
        return loss


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eeta: float = 0.001,
) -> torch.optim.Optimizer:
    """`sgd` (momentum), `adamw` or `lars` over `groups`; a group's own `weight_decay`/`lr` win over these."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eeta=eeta)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group without `fixed_lr` the scheduled `lr` (times its `lr_scale`)."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr * group.get("lr_scale", 1.0)

