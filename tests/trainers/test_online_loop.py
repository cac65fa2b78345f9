"""The online loop on plain tensors: each stream batch's steps under the LR cycle, deadlines counted exactly, the
memory fed after a batch, RALS's selection, and a resume mid-stream that continues exactly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from trainers.engine.loop import LineTrainer, LoopConfig
from trainers.engine.types import Batch
from trainers.online.config import OnlineConfig
from trainers.online.loop import OnlineTrainer
from trainers.views.augment import AugmentConfig


def line(wrap_model=None, rank: int = 0, **overrides) -> LineTrainer:
    base = dict(method="simclr", strategy="sequential", image_size=16,
                views=(AugmentConfig(size=16, blur_p=0.0), AugmentConfig(size=16, blur_p=0.0)),
                backbone_width=4, lr=0.05, batch_size=8, seed=3, method_options={"proj_hidden": 16, "proj_out": 8})
    base.update(overrides)
    return LineTrainer(LoopConfig(**base), wrap_model=wrap_model, rank=rank)


def stream(n: int, size: int = 8, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch.from_images(torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=g),
                              index=torch.arange(k * size, (k + 1) * size)) for k in range(n)]


def online_cfg(**overrides) -> OnlineConfig:
    return OnlineConfig.parse("online", **{"batch_size": 8, "steps_per_batch": 3, "max_lr": 0.05,
                                           "memory_size": 12, "memory_batch": 4, **overrides})


class Clock:
    """A wall clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_each_batch_takes_its_steps_under_the_cycle_and_then_joins_the_memory(one_torch_thread) -> None:
    online = OnlineTrainer(line(), online_cfg())
    seen_lrs, seen_momenta = [], []
    optimizer = online.trainer.optimizer
    original = optimizer.step

    def spy(*args, **kwargs):
        seen_lrs.append(optimizer.param_groups[0]["lr"])
        seen_momenta.append(optimizer.param_groups[0]["momentum"])
        return original(*args, **kwargs)

    optimizer.step = spy
    reports = [online.learn(b) for b in stream(3)]
    assert [r.steps for r in reports] == [3, 3, 3] and not any(r.late for r in reports)
    cycle = [online.cycle.lr(s) for s in range(3)]
    assert seen_lrs == pytest.approx(cycle * 3)  # restarted with every batch
    assert seen_lrs[0] == pytest.approx(0.005)  # max_lr / div_factor
    assert seen_momenta == pytest.approx([online.cycle.momentum(s) for s in range(3)] * 3)
    # The memory holds only rows of batches already learned: none before the first, 8 then 12 (its bound).
    assert [r.memory_rows for r in reports] == [8, 12, 12]
    assert online.batches_done == 3 and online.steps_done == 9
    assert all(math.isfinite(r.loss) for r in reports)


def test_constant_lr_is_max_lr_at_every_step(one_torch_thread) -> None:
    online = OnlineTrainer(line(), online_cfg(schedule="constant", max_lr=0.02))
    report = online.learn(stream(1)[0])
    assert report.lr == 0.02 and online.trainer.optimizer.param_groups[0]["lr"] == 0.02


def test_deadlines_are_counted_exactly_when_the_stream_outpaces_training(one_torch_thread) -> None:
    # The clock moves 1 s per read and each batch's deadline is 2.5 s after the previous: the deadline check before
    # step s reads the clock once, so a batch gets exactly the steps whose check comes before its deadline.
    clock = Clock()
    online = OnlineTrainer(line(), online_cfg(steps_per_batch=4, late_policy="drop"), clock=clock)
    reports = []
    for batch in stream(4):
        reports.append(online.learn(batch, deadline=clock.now + 2.5))
    assert [r.steps for r in reports] == [2, 2, 2, 2] and all(r.late for r in reports)
    assert [r.dropped_steps for r in reports] == [2, 2, 2, 2]
    assert online.late_batches == 4 and online.dropped_steps == 8
    # Queue: every step is taken, the batch is still late, the next one waits.
    clock = Clock()
    queued = OnlineTrainer(line(), online_cfg(steps_per_batch=4, late_policy="queue"), clock=clock)
    reports = [queued.learn(b, deadline=clock.now + 2.5) for b in stream(3)]
    assert [r.steps for r in reports] == [4, 4, 4] and all(r.late for r in reports)
    assert queued.late_batches == 3 and queued.dropped_steps == 0
    # A deadline far away: nothing is late.
    relaxed = OnlineTrainer(line(), online_cfg(), clock=Clock())
    assert not relaxed.learn(stream(1)[0], deadline=1e9).late and relaxed.late_batches == 0


def test_a_budget_shorter_than_a_step_warns_with_the_measured_step_time(one_torch_thread) -> None:
    online = OnlineTrainer(line(), online_cfg(time_budget_s=1e-6, steps_per_batch=3))
    with pytest.warns(RuntimeWarning, match=r"time_budget_s \(1e-06 s\) is shorter than one training step"):
        online.learn(stream(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        online.learn(stream(1)[0])  # said once


def test_rals_trains_on_k_candidates_and_reports_the_new_share(one_torch_thread) -> None:
    online = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    sizes = []
    original = online.trainer.model.forward

    def spy(views, batch, ctx):
        sizes.append(len(batch))
        return original(views, batch, ctx)

    online.trainer.model.forward = spy
    first = online.learn(stream(1)[0])
    assert math.isnan(first.new_fraction)  # empty memory: 8 candidates <= k, nothing to choose
    second = online.learn(stream(2, seed=1)[1])
    assert 0.0 <= second.new_fraction <= 1.0 and second.rals_seconds > 0
    assert sizes == [8] * 3 + [10] * 3  # 16 candidates once the memory holds rows: the top 10 are trained on


def test_resuming_mid_stream_continues_exactly(one_torch_thread) -> None:
    batches = stream(6)
    straight = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    for b in batches:
        straight.learn(b)

    first = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    for b in batches[:3]:
        first.learn(b)
    state = {**first.state_dict(), **first.rank_states()}
    resumed = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    resumed.load_state_dict(state)
    assert resumed.batches_done == 3
    for b in batches[3:]:
        resumed.learn(b)
    for a, b in zip(straight.trainer.method.state_dict().values(), resumed.trainer.method.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.memory.index, resumed.memory.index)
    assert straight.counters() == resumed.counters()


def test_the_selection_log_survives_a_resume(one_torch_thread) -> None:
    online = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    for b in stream(3):
        online.learn(b)
    state = {**online.state_dict(), **online.rank_states()}
    resumed = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    resumed.load_state_dict(state)
    assert len(resumed.selection) == len(online.selection) == 2  # the first batch had nothing to choose from
    assert resumed.selection.running_mean == online.selection.running_mean


def test_cassle_online_freezes_the_model_when_a_task_ends_and_distils_from_it(one_torch_thread) -> None:
    online = OnlineTrainer(line(strategy="sequential+cassle", strategy_options={"cassle": {"hidden": 16}}),
                           online_cfg())
    cassle = next(s for s in online.trainer.strategy.strategies if s.name == "cassle")
    predictor = {k: v.clone() for k, v in cassle.predictor.state_dict().items()}
    batches = stream(3)
    online.learn(batches[0], task=0)
    online.learn(batches[1], task=0)
    assert cassle.frozen_chunk == -1  # no task has ended: nothing to distil from
    assert all(torch.equal(v, predictor[k]) for k, v in cassle.predictor.state_dict().items())
    at_task_end = {k: v.clone() for k, v in online.trainer.method.embedder().state_dict().items()}
    online.learn(batches[2], task=1)
    assert cassle.frozen_chunk == 0
    assert all(torch.equal(v, at_task_end[k]) for k, v in cassle.frozen.state_dict().items())
    # The distillation term now trains the predictor (it gets gradients from nothing else).
    assert any(not torch.equal(v, predictor[k]) for k, v in cassle.predictor.state_dict().items())
    assert online.state_dict()["online"]["task"] == 1


def test_a_loss_that_turns_nan_stops_the_batch_naming_it(one_torch_thread) -> None:
    from trainers.engine.step import NonFiniteLossError
    from trainers.engine.types import StepOutput

    online = OnlineTrainer(line(), online_cfg())
    online.learn(stream(1)[0])
    method = online.trainer.method
    original = method.training_step

    def poisoned(views, batch, ctx):
        out = original(views, batch, ctx)
        return StepOutput(out.loss * float("nan"), out.per_sample, out.terms, out.embeddings)

    method.training_step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"simclr: the loss became non-finite on stream batch 1"):
        online.learn(stream(2)[1])
    assert online.batches_done == 1  # the batch is not counted as learned


class StepClock:
    """A wall clock that stands still when read and moves `step_s` seconds with every optimizer step."""

    def __init__(self, step_s: float = 1.0) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        return self.now

    def attach(self, optimizer) -> None:
        original = optimizer.step

        def step(*args, **kwargs):
            self.now += self.step_s
            return original(*args, **kwargs)

        optimizer.step = step


def _budgeted(clock: StepClock, **overrides) -> OnlineTrainer:
    online = OnlineTrainer(line(), online_cfg(**{"steps_per_batch": 10, "late_policy": "drop", "time_budget_s": 5.5,
                                                 **overrides}), clock=clock)
    clock.attach(online.trainer.optimizer)
    return online


def test_a_deadline_fits_the_cycle_to_the_steps_there_is_time_for_so_the_last_one_is_annealed(
        one_torch_thread) -> None:
    # 10 planned steps, 1 s a step, the next batch 5.5 s later: 5 steps fit. A truncated 10-step cycle would stop
    # at step 5 of 10, just after its peak (0.045 of max_lr 0.05); the fitted cycle runs over those 5 steps.
    clock = StepClock()
    online = _budgeted(clock)
    lrs = []
    for batch in stream(3):
        report = online.learn(batch, deadline=clock.now + 5.5)
        lrs.append(report.lr)
        assert report.steps == 5 and report.cycle_steps == 5 and report.dropped_steps == 5
        assert not report.late  # its (fitted) cycle ended in time
    final_lr = online.cycle.final_lr
    assert lrs == pytest.approx([final_lr] * 3)  # 5e-7: the cycle's minimum
    assert online.cycle.lr(5) > 0.8 * 0.05  # what the truncated planned cycle ended on
    # The ranks' agreed estimate is steps that fit at the mean step time: 2.5 s a step -> 1 + 1 step, raised to
    # the shortest cycle with a warm-up (3), then cut by the deadline as before.
    slow = StepClock(step_s=2.5)
    online = _budgeted(slow)
    report = online.learn(stream(1)[0], deadline=slow.now + 5.5)
    assert report.cycle_steps == 3 and report.steps == 3 and report.lr == pytest.approx(final_lr)


def test_a_planned_cycle_fit_keeps_the_truncation(one_torch_thread) -> None:
    clock = StepClock()
    online = _budgeted(clock, cycle_fit="planned")
    report = online.learn(stream(1)[0], deadline=clock.now + 5.5)
    assert report.steps == 6 and report.cycle_steps == 10 and report.late
    assert report.lr == pytest.approx(online.cycle.lr(5))
    # Without a deadline, or with the queue policy, every planned step is taken under the planned cycle.
    queued = _budgeted(StepClock(), late_policy="queue")
    report = queued.learn(stream(1)[0], deadline=queued.clock.now + 5.5)
    assert report.steps == 10 and report.cycle_steps == 10 and report.lr == pytest.approx(queued.cycle.final_lr)


def test_the_selection_profile_per_local_step_is_in_the_counters(one_torch_thread) -> None:
    online = OnlineTrainer(line(), online_cfg(rals=True, rals_k=10, memory_batch=8))
    assert online.counters()["rals_new_fraction_by_step"] == []
    for b in stream(3):
        online.learn(b)
    profile = online.counters()["rals_new_fraction_by_step"]
    assert len(profile) == 3 and all(0.0 <= f <= 1.0 for f in profile)  # 3 steps a batch, 2 batches with RALS
    assert sum(profile) / 3 == pytest.approx(online.selection.running_mean)
