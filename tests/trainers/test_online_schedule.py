"""SLCLRS: the one-cycle LR and momentum restarted per stream batch, step for step against torch's OneCycleLR."""

from __future__ import annotations

import pytest
import torch

from trainers.online.schedule import LocalCycle
from trainers.optim import LARS

MAX_LR = 0.4


def sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("pct_start", [None, 0.3])
@pytest.mark.parametrize("steps", [10, 20, 50, 100])
def test_matches_a_fresh_one_cycle_lr_per_stream_batch(steps: int, pct_start: float | None,
                                                       one_torch_thread) -> None:
    cycle = LocalCycle(MAX_LR, steps, pct_start=pct_start)
    pct = cycle.warmup_fraction
    ours, theirs = sgd(), sgd()
    for _stream_batch in range(3):  # each batch restarts the cycle: torch needs a new scheduler, ours the step
        reference = torch.optim.lr_scheduler.OneCycleLR(
            theirs, max_lr=MAX_LR, total_steps=steps, pct_start=pct, anneal_strategy="cos", cycle_momentum=True,
            base_momentum=0.85, max_momentum=0.95, div_factor=10.0, final_div_factor=1e4, three_phase=False)
        for step in range(steps):
            cycle.apply(ours, step)
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12, abs=0)
            assert ours.param_groups[0]["momentum"] == pytest.approx(theirs.param_groups[0]["momentum"],
                                                                     rel=1e-12, abs=0)
            assert cycle.lr(step) == ours.param_groups[0]["lr"]
            theirs.step()
            reference.step()


@pytest.mark.parametrize("steps, expected", [(10, 0.5), (20, 0.5), (49, 0.5), (50, 0.25), (100, 0.25)])
def test_default_warmup_fraction_is_a_quarter_from_50_steps(steps: int, expected: float) -> None:
    assert LocalCycle(MAX_LR, steps).warmup_fraction == expected
    assert LocalCycle(MAX_LR, steps, pct_start=0.4).warmup_fraction == 0.4  # an explicit value wins


# 50 steps x the default 0.25 puts the peak between steps 11 and 12 (as in torch), so that case gives 0.2.
@pytest.mark.parametrize("steps, pct_start", [(10, None), (20, None), (50, 0.2), (100, None)])
def test_starts_at_max_lr_over_div_factor_peaks_at_max_lr_and_anneals(steps: int, pct_start: float | None) -> None:
    cycle = LocalCycle(MAX_LR, steps, pct_start=pct_start, div_factor=5.0)
    peak_step = round(cycle.warmup_fraction * steps) - 1
    lrs = [cycle.lr(s) for s in range(steps)]
    assert lrs[0] == pytest.approx(MAX_LR / 5.0)
    assert cycle.momentum(0) == pytest.approx(0.95)  # momentum is highest where the LR is lowest
    assert max(lrs) == pytest.approx(MAX_LR) and lrs.index(max(lrs)) == peak_step
    assert cycle.momentum(peak_step) == pytest.approx(0.85)
    assert lrs[-1] == pytest.approx(MAX_LR / 5.0 / 1e4)
    assert cycle.momentum(steps - 1) == pytest.approx(0.95)
    assert all(a < b for a, b in zip(lrs[:peak_step], lrs[1:peak_step + 1]))  # rises, then falls
    assert all(a > b for a, b in zip(lrs[peak_step:-1], lrs[peak_step + 1:]))


def test_apply_sets_sgd_momentum_adam_beta1_and_lars_momentum() -> None:
    cycle = LocalCycle(MAX_LR, 10)
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = torch.optim.AdamW(params, lr=1.0, betas=(0.9, 0.999))
    cycle.apply(adam, 4)
    assert adam.param_groups[0]["betas"] == (pytest.approx(0.85), 0.999) and "momentum" not in adam.param_groups[0]
    assert adam.param_groups[0]["lr"] == pytest.approx(MAX_LR)
    optimizer = sgd()
    cycle.apply(optimizer, 4)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.85)
    lars = LARS([{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(1))], "fixed_lr": True,
                                      "lr": 0.05}], lr=1.0)
    cycle.apply(lars, 0)
    assert lars.param_groups[0]["lr"] == pytest.approx(MAX_LR / 10) and lars.param_groups[1]["lr"] == 0.05
    assert [g["momentum"] for g in lars.param_groups] == [pytest.approx(0.95)] * 2


def test_apply_refuses_an_optimizer_without_momentum() -> None:
    adagrad = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="momentum"):
        LocalCycle(MAX_LR, 10).apply(adagrad, 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_lr": 0.0}, "max_lr"),
    ({"steps_per_batch": 1}, "steps_per_batch"),
    ({"steps_per_batch": 10.0}, "steps_per_batch"),
    ({"pct_start": 1.0}, "pct_start"),
    ({"pct_start": 0.1}, "pct_start"),  # a warm-up of one step: torch divides by zero
    ({"steps_per_batch": 2}, "pct_start x steps_per_batch"),  # so does the default 0.5 of 2 steps
    ({"div_factor": 0.0}, "div_factor"),
    ({"final_div_factor": -1.0}, "final_div_factor"),
    ({"base_momentum": 1.0}, "base_momentum"),
    ({"max_momentum": 0.5}, "max_momentum"),
])
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalCycle(**{"max_lr": MAX_LR, "steps_per_batch": 10, **kwargs})


@pytest.mark.parametrize("step", [-1, 10, 2.0])
def test_a_step_outside_the_batch_is_refused(step) -> None:
    with pytest.raises(ValueError, match="step_in_batch"):
        LocalCycle(MAX_LR, 10).lr(step)


def test_a_fitted_cycle_is_the_same_cycle_over_fewer_steps_and_never_shorter_than_a_warm_up():
    cycle = LocalCycle(max_lr=0.3, steps_per_batch=10)
    assert cycle.fitted(10) is cycle and cycle.min_steps == 3  # 0.5 x 3 > 1
    five = cycle.fitted(5)
    assert five.steps_per_batch == 5 and five.lr(0) == cycle.lr(0) and five.momentum(0) == cycle.momentum(0)
    assert five.lr(4) == pytest.approx(cycle.final_lr)  # annealed at its last step
    assert cycle.fitted(1).steps_per_batch == 3 and cycle.fitted(0).steps_per_batch == 3
    assert LocalCycle(max_lr=0.3, steps_per_batch=60, pct_start=0.1).min_steps == 11
    long = LocalCycle(max_lr=0.3, steps_per_batch=60)
    assert long.warmup_fraction == 0.25 and long.fitted(20).warmup_fraction == 0.5  # the default of its length
