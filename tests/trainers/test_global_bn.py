"""Global BN for the heads: 2 gloo ranks holding half a batch each give the outputs, gradients and running
statistics of one process with the whole batch (torch's SyncBatchNorm refuses CPU tensors)."""

from __future__ import annotations

import math

import pytest
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


# ---------------------------------------------------------------------------------------------- sync_bn + EMA
# Every method with a momentum (target) network whose heads hold BatchNorm1d, as `optim.sync_bn: true` trains it.
EMA_METHODS = {
    "byol": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32, "base_momentum": 0.9},
    "moco_v2_plus": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32, "queue_size": 32, "base_momentum": 0.9},
    "moco_v2": {"proj_hidden": 32, "proj_out": 16, "queue_size": 32, "proj_bn": True, "base_momentum": 0.9},
    "dino": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "use_bn": True, "base_momentum": 0.9,
             "freeze_last_layer": 0},
}


def _ema_config(method: str):
    from trainers.engine.loop import LoopConfig
    from trainers.views.augment import AugmentConfig
    from trainers.views.plan import ViewPlan

    global_ = (AugmentConfig(size=16, blur_p=0.0), AugmentConfig(size=16, blur_p=0.0))
    local = (AugmentConfig(size=8, scale=(0.05, 0.4), blur_p=0.0),) if method == "dino" else ()
    return LoopConfig(method=method, strategy="sequential", image_size=16, views=ViewPlan(global_, local),
                      backbone_width=8, lr=0.05, epochs_per_chunk=1, batch_size=4, seed=3, sync_bn=True,
                      line_steps=6, method_options=EMA_METHODS[method])


def _train_with_sync_bn(method: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from trainers.engine.loop import LineTrainer
    from trainers.methods.global_bn import GlobalBatchNorm1d

    trainer = LineTrainer(_ema_config(method), wrap_model=DistributedDataParallel, rank=rank)
    targets = [p for _, target in trainer.method.momentum_pairs() for p in target.parameters()]
    onlines = [p for online, _ in trainer.method.momentum_pairs() for p in online.parameters()]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    reduced = {id(p) for p in trainer.model._module_parameters if p.requires_grad}  # what DDP's reducer waits for
    steps: list[dict] = []

    def snapshot(momentum: float | None = None) -> dict:
        return {"momentum": momentum, "targets": [t.detach().clone() for t in targets],
                "onlines": [o.detach().clone() for o in onlines]}

    def before_step(module, args, kwargs) -> None:  # each step's forward: the weights before its update
        steps.append(snapshot(module.momentum_at(args[2].progress)))

    trainer.method.register_forward_pre_hook(before_step, with_kwargs=True)
    g = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    report = trainer.train_chunk(0, lambda epoch, skip: (images[i:i + 4] for i in range(4 * skip, 12, 4)),
                                 steps_per_epoch=3)
    steps.append(snapshot())  # after the last step
    return {"losses": report.losses, "steps": steps,
            "target_requires_grad": [t.requires_grad for t in targets],
            "targets_optimized": sum(id(t) in optimized for t in targets),
            "targets_reduced": sum(id(t) in reduced for t in targets),
            "global_bn_in_targets": sum(isinstance(m, GlobalBatchNorm1d)
                                        for _, target in trainer.method.momentum_pairs() for m in target.modules())}


def _sync_bn_worker(rank: int, world: int) -> dict:
    return {method: _train_with_sync_bn(method, rank) for method in EMA_METHODS}


@pytest.fixture(scope="module")
def sync_bn_runs() -> list[dict]:
    """Every EMA method trained 3 steps under DDP with sync_bn on 2 gloo ranks (one spawn for all of them)."""
    return run_ddp(_sync_bn_worker)


@pytest.mark.parametrize("method", sorted(EMA_METHODS))
def test_sync_bn_trains_every_ema_method_under_ddp_with_frozen_targets(sync_bn_runs, method: str) -> None:
    ranks = [r[method] for r in sync_bn_runs]
    for r in ranks:
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert r["global_bn_in_targets"] >= 1  # the target's heads normalise over the global batch too
        assert not any(r["target_requires_grad"])
        assert r["targets_optimized"] == 0 and r["targets_reduced"] == 0
        # Only the EMA moved the targets: after every step each one is exactly m x its value before the step +
        # (1 - m) x the online weights after it.
        for now, nxt in zip(r["steps"], r["steps"][1:]):
            m = now["momentum"]
            assert 0.9 <= m < 1.0
            for before, online, after in zip(now["targets"], nxt["onlines"], nxt["targets"], strict=True):
                assert torch.allclose(after, m * before + (1 - m) * online, atol=1e-6)
        assert any(not torch.equal(a, b) for a, b in zip(r["steps"][0]["targets"], r["steps"][-1]["targets"]))
    for a, b in zip(ranks[0]["steps"][-1]["targets"], ranks[1]["steps"][-1]["targets"], strict=True):
        assert torch.equal(a, b)  # the replicas' targets stay identical
