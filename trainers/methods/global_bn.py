"""BatchNorm over the global batch for the methods' heads, on any device (gloo on CPU included).

    head = convert_global_bn(mlp(512, 2048, 128))    # every BatchNorm1d in it now normalises over all ranks

SimCLR's paper normalises the projector with global BN: with per-worker statistics each worker's batch leaks which
samples share it, a shortcut for the contrastive task. torch's SyncBatchNorm would do it but runs only on GPUs;
heads see `[B, D]` features, so gathering them (with gradient) is cheap and gives exactly the statistics, outputs
and gradients of one process holding the whole batch. Outside torch.distributed it is plain BatchNorm1d.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainers.engine.distributed import gather_with_grad, world


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch gathered from every rank."""

    def forward(self, x: Tensor) -> Tensor:
        _, size = world()
        if not self.training or size == 1:
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects [B, D] features, got {tuple(x.shape)}")
        full = gather_with_grad(x)
        mean = full.mean(dim=0)
        var = full.var(dim=0, unbiased=False)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                n = full.shape[0]
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * n / max(n - 1, 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                self.num_batches_tracked += 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def convert_global_bn(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1d replaced by a GlobalBatchNorm1d holding the same parameters and buffers.

    Each new parameter keeps its original's `requires_grad`: a frozen EMA target (`frozen_copy`) stays frozen, so
    its BN weights reach neither the optimizer nor DDP's reducer (which would wait for gradients that never come).
    """
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        new = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        for name, param in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        new.train(module.training)
        return new.to(next(iter(module.state_dict().values())).device) if module.state_dict() else new
    for name, child in module.named_children():
        setattr(module, name, convert_global_bn(child))
    return module


__all__ = ["GlobalBatchNorm1d", "convert_global_bn"]
