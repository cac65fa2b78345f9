"""Global BN for the heads: 2 gloo ranks holding half a batch each give the outputs, gradients and running
statistics of one process with the whole batch (torch's SyncBatchNorm refuses CPU tensors)."""

from __future__ import annotations

import torch

from tests.trainers.ddp_harness import rows, run_ddp
from trainers.methods.global_bn import GlobalBatchNorm1d, convert_global_bn
from trainers.methods.heads import mlp


def _head_and_batch():
    torch.manual_seed(0)
    head = mlp(6, 16, 4, last_bn=True)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    return head, x


def _worker(rank: int, world: int) -> dict:
    head, x = _head_and_batch()
    head = convert_global_bn(head)
    local = rows(x, rank, world).clone().requires_grad_()
    out = head(local)
    loss = (out ** 2).sum(dim=1).mean()  # a per-sample mean, as a method's loss
    loss.backward()
    return {"out": out.detach(), "grad_x": local.grad, "grad_w": head[0].weight.grad,
            "running_mean": head[1].running_mean.clone(), "running_var": head[1].running_var.clone()}


def test_two_ranks_with_global_bn_equal_one_process_with_the_whole_batch() -> None:
    ranks = run_ddp(_worker)
    head, x = _head_and_batch()
    x = x.clone().requires_grad_()
    out = head(x)
    (out ** 2).sum(dim=1).mean().backward()
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5)
    # Rank r receives d(sum of both ranks' losses)/dx_r = 2 x d(global mean)/dx_r; DDP then averages weight grads.
    assert torch.allclose(torch.cat([r["grad_x"] for r in ranks]), 2 * x.grad, atol=1e-5)
    assert torch.allclose((ranks[0]["grad_w"] + ranks[1]["grad_w"]) / 2, head[0].weight.grad, atol=1e-5)
    for r in ranks:
        assert torch.allclose(r["running_mean"], head[1].running_mean, atol=1e-6)
        assert torch.allclose(r["running_var"], head[1].running_var, atol=1e-5)


def test_conversion_keeps_parameters_and_is_plain_bn_on_one_process() -> None:
    head, x = _head_and_batch()
    expected = head(x)
    converted = convert_global_bn(head)
    assert isinstance(converted[1], GlobalBatchNorm1d)
    assert torch.allclose(converted(x), expected, atol=1e-6)
