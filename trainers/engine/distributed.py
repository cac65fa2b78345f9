"""Cross-rank collectives the losses need, on torch's current single-tensor collectives.

    z_all = gather_with_grad(z)      # [B * world, ...]; gradients flow back to the rank that owns each row
    k_all = gather(z.detach())       # the same without autograd (queues, targets)
    c = all_reduce_mean(batch_centre)

Without an initialised process group (or with one rank) every function returns its input: the same code runs on
one worker. Every rank must pass the same shape (drop incomplete last batches).

`torch.distributed.nn.functional.all_gather`, which the first SimCLR used, is deprecated in torch 2.14 and warns
on every call; `all_gather_single` / `reduce_scatter_single` are the collectives that replace it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(x: Tensor, size: int) -> Tensor:
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, x.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    That is the gradient of sum over ranks of each rank's loss, the quantity DDP's gradient averaging then divides
    by the world size: a loss over the gathered batch gets the same gradient as on one process holding it all.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.size = dist.get_world_size()
        return _gather_rows(x, ctx.size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty((grad.shape[0] // ctx.size, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


def gather_with_grad(x: Tensor) -> Tensor:
    """`[B, ...]` on each rank -> `[B * world, ...]`, rank r's rows at `r * B`; differentiable."""
    _, size = world()
    return x if size == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """`[B, ...]` -> `[B * world, ...]` without autograd."""
    _, size = world()
    return x if size == 1 else _gather_rows(x, size)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum over ranks of `x` (a new tensor; `x` is untouched)."""
    _, size = world()
    if size == 1:
        return x.clone()
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean over ranks of `x`."""
    return all_reduce_sum(x) / world()[1]


__all__ = ["all_reduce_mean", "all_reduce_sum", "gather", "gather_with_grad", "world"]
