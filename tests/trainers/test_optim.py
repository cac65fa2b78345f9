"""Optimisers and schedules: LARS against its formula computed by hand, the no-decay group, the scaling rule, the
schedules against torch's own schedulers, fixed-LR groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainers.backbones import build_backbone
from trainers.methods import METHODS
from trainers.optim import LARS, build_optimizer, param_groups, scaled_lr, set_lr
from trainers.schedules import Constant, WarmupCosine, build_schedule

# ------------------------------------------------------------------ LARS


def _norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def test_lars_two_steps_match_the_papers_formula() -> None:
    """Algorithm 1 of You et al. 2017 on a 4-element weight, two steps with momentum, in plain Python floats."""
    w0 = [0.5, -1.0, 2.0, 0.25]
    g1 = [0.1, 0.2, -0.3, 0.05]
    g2 = [-0.05, 0.4, 0.1, 0.0]
    lr1, lr2, m, wd, eeta = 0.8, 0.4, 0.9, 0.01, 0.02

    def local_step(w, g, lr):
        trust = eeta * _norm(w) / (_norm(g) + wd * _norm(w))
        return [lr * trust * (gi + wd * wi) for wi, gi in zip(w, g)]

    v1 = local_step(w0, g1, lr1)
    w1 = [wi - vi for wi, vi in zip(w0, v1)]
    v2 = [m * a + b for a, b in zip(v1, local_step(w1, g2, lr2))]
    w2 = [wi - vi for wi, vi in zip(w1, v2)]

    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = LARS([p], lr=lr1, momentum=m, weight_decay=wd, eeta=eeta)
    p.grad = torch.tensor(g1, dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == pytest.approx(w1, rel=1e-12, abs=1e-15)
    opt.param_groups[0]["lr"] = lr2
    p.grad = torch.tensor(g2, dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == pytest.approx(w2, rel=1e-12, abs=1e-15)
    # The numbers themselves, so a sign slip in the hand computation would show too.
    assert w1[0] == pytest.approx(0.5 - 0.8 * (0.02 * _norm(w0) / (_norm(g1) + 0.01 * _norm(w0))) * 0.105)


def test_lars_excluded_group_is_plain_momentum_sgd_without_decay() -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float64))
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.1, momentum=0.9, weight_decay=0.5, eeta=0.001)
    b.grad = torch.tensor([0.2, -0.4], dtype=torch.float64)
    w.grad = torch.tensor([0.3, 0.1], dtype=torch.float64)
    opt.step()
    assert b.detach().tolist() == pytest.approx([0.5 - 0.1 * 0.2, 0.5 + 0.1 * 0.4], abs=1e-15)
    b.grad = torch.tensor([0.0, 0.1], dtype=torch.float64)
    opt.step()
    # v2 = 0.9 * v1 + lr * g2
    assert b.detach().tolist() == pytest.approx(
        [0.48 - 0.9 * 0.02, 0.54 - (0.9 * -0.04 + 0.01)], abs=1e-15)


def test_lars_zero_weight_gets_trust_one() -> None:
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LARS([p], lr=0.5, momentum=0.0, weight_decay=0.1, eeta=0.001)
    p.grad = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == pytest.approx([-0.5, -1.0, 0.5])


def test_lars_refuses_bad_settings() -> None:
    p = [nn.Parameter(torch.zeros(1))]
    for kwargs, word in [({"eeta": 0.0}, "eeta"), ({"momentum": 1.0}, "momentum"),
                         ({"weight_decay": -1.0}, "weight_decay"), ({"lr": -0.1}, "lr")]:
        with pytest.raises(ValueError, match=word):
            LARS(p, **{"lr": 0.1, **kwargs})
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", [{"params": p}], lr=0.1)


# ------------------------------------------------------------------ param groups


def _resnet_method() -> nn.Module:
    torch.manual_seed(0)
    return METHODS["simclr"](build_backbone("resnet18", 32, width=8), proj_hidden=16, proj_out=8)


def test_param_groups_of_a_resnet_put_biases_and_norms_in_the_no_decay_group() -> None:
    model = _resnet_method()
    decay, no_decay = param_groups(model, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert len(decay_ids) == len(decay["params"]) and len(no_decay_ids) == len(no_decay["params"])
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}  # every parameter, once

    expected_decay, expected_no_decay = set(), set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) or name == "bias":
                expected_no_decay.add(id(p))
            else:
                assert isinstance(module, nn.Conv2d | nn.Linear) and name == "weight", f"{module_name}.{name}"
                expected_decay.add(id(p))
    assert decay_ids == expected_decay and no_decay_ids == expected_no_decay
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    linear_biases = [m.bias for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(no_decay["params"]) == 2 * len(bn) + len(linear_biases) and len(linear_biases) >= 1
    assert len(decay["params"]) == len(convs) + sum(isinstance(m, nn.Linear) for m in model.modules())


def test_param_groups_leave_out_frozen_parameters_and_can_be_turned_off() -> None:
    torch.manual_seed(0)
    byol = METHODS["byol"](build_backbone("resnet18", 32, width=8), proj_hidden=16, proj_out=8, pred_hidden=16)
    groups = param_groups(byol, 0.1)
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in byol.parameters() if p.requires_grad}
    assert any(not p.requires_grad for p in byol.parameters())  # the EMA target exists and is left out
    flat = param_groups(byol, 0.1, exclude_norm_and_bias=False)
    assert len(flat[0]["params"]) == len(covered) and flat[1]["params"] == []


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_weight_decay_spares_norm_weights_and_biases(name: str) -> None:
    """Zero gradients: only weight decay moves a parameter, so the decayed group moves and the other does not."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].weight.fill_(1.5)
        model[1].bias.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(name, param_groups(model, weight_decay=0.1), lr=0.5, momentum=0.9, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = model.state_dict()
    for key in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[key], before[key]), key
    if name == "sgd":
        assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.5 * 0.1))
    elif name == "adamw":
        assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.5 * 0.1))  # decoupled decay
    else:  # zero gradient: trust = eeta / wd, the update lr * eeta * w
        assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.5 * 0.001))


# ------------------------------------------------------------------ LR scaling and fixed-LR groups


def test_linear_scaling_rule() -> None:
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.3, 128, "linear") == pytest.approx(0.15)
    assert scaled_lr(0.3, 4096, "none") == 0.3
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(0.3, 256, "sqrt")
    with pytest.raises(ValueError, match="global batch"):
        scaled_lr(0.3, 0, "linear")


def test_set_lr_leaves_fixed_lr_groups_alone_and_applies_lr_scale() -> None:
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": True, "lr": 0.05},
                           {"params": [c], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.05, 0.04])


# ------------------------------------------------------------------ schedules vs torch


def _torch_warmup_cosine(peak: float, total: int, warmup: int) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    sched = torch.optim.lr_scheduler
    if warmup == 0:
        scheduler = sched.CosineAnnealingLR(opt, T_max=total)
    else:
        warm = sched.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
        cosine = sched.CosineAnnealingLR(opt, T_max=total - warmup)
        scheduler = sched.SequentialLR(opt, [warm, cosine], milestones=[warmup])
    values = []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("total,warmup", [(10, 0), (10, 1), (12, 2), (20, 5), (50, 10)])
def test_warmup_cosine_equals_torchs_sequential_lr(total: int, warmup: int) -> None:
    ours = [WarmupCosine(0.7, total, warmup).lr(s) for s in range(total)]
    assert ours == pytest.approx(_torch_warmup_cosine(0.7, total, warmup), rel=1e-9, abs=1e-12)


def test_constant_equals_torchs_constant_and_linear_warmup() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / 4, end_factor=1.0, total_iters=3)
    reference = []
    for _ in range(10):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert [Constant(0.2, 4).lr(s) for s in range(10)] == pytest.approx(reference, rel=1e-12)
    assert [Constant(0.2).lr(s) for s in (0, 5, 10_000)] == [0.2, 0.2, 0.2]


def test_warmup_edge_cases() -> None:
    s = WarmupCosine(1.0, total_steps=10, warmup_steps=4)
    assert [s.lr(i) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert s.lr(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))  # the last step is not wasted at 0
    assert s.lr(10) == pytest.approx(0.0) and s.lr(99) == pytest.approx(0.0)  # past the end: the floor
    assert WarmupCosine(1.0, 10, 1).lr(0) == 1.0  # a one-step warm-up is the peak at once
    longer = WarmupCosine(1.0, total_steps=4, warmup_steps=8)  # all warm-up, never reaching the peak
    assert [longer.lr(i) for i in range(4)] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert WarmupCosine(1.0, 1).lr(0) == 1.0
    assert WarmupCosine(1.0, 10, 0, final=0.1).lr(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(1.0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        Constant(1.0, -1)
    with pytest.raises(ValueError, match="schedule"):
        build_schedule("step", 1.0, 10)
    assert build_schedule("cosine_line", 2.0, 100, 10) == WarmupCosine(2.0, 100, 10)
    assert build_schedule("constant", 2.0, 100, 10) == Constant(2.0, 10)
