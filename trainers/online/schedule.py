"""The single local cycle LR scheduler (SLCLRS): a one-cycle LR and momentum, restarted with every stream batch.

    cycle = LocalCycle(max_lr=0.3, steps_per_batch=50)      # pct_start 0.25 at >= 50 steps, else 0.5
    for stream_batch in stream:
        for step_in_batch in range(cycle.steps_per_batch):
            cycle.apply(optimizer, step_in_batch)           # LR and momentum (or Adam's beta1) of every group
            ...train one step on stream_batch (and the replay memory)...

Online training never knows when the stream ends, so no schedule over the whole run can be planned. Instead each
stream batch gets its own cycle over its N steps: the LR rises by half a cosine from `max_lr / div_factor` to
`max_lr` over the first `pct_start` of the steps, then falls by half a cosine to
`max_lr / div_factor / final_div_factor`; momentum moves the other way, from `max_momentum` down to
`base_momentum` at the LR's peak and back up (a high LR goes with a low momentum).

The values are exactly those of torch's `OneCycleLR(total_steps=N, anneal_strategy="cos", three_phase=False,
cycle_momentum=True)` with the same factors, created afresh for every stream batch. Its warm-up phase ends at
step `pct_start * N - 1` (a float: when that is not a whole number, no step sits exactly on `max_lr`) and the
annealing phase at step `N - 1`.

A cycle is a pure function of the step inside the batch, so nothing needs saving in a checkpoint.

Under a time budget a batch may get fewer steps than planned; `fitted(n)` is the cycle over `n` steps instead
(at least `min_steps`, the shortest cycle that has a warm-up), so the LR still anneals by the last step that
fits. Every cycle starts at the same LR and momentum, so the length can be chosen after the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from trainers.optim import set_lr

# The paper's warm-up fraction for long cycles, and the shorter cycles' (a quarter of 10 steps is too few).
LONG_CYCLE_STEPS = 50
LONG_CYCLE_PCT_START = 0.25
SHORT_CYCLE_PCT_START = 0.5


def _cos_anneal(start: float, end: float, pct: float) -> float:
    """Half a cosine from `start` (pct 0) to `end` (pct 1), written as torch writes it so values agree bit for bit."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


@dataclass(frozen=True)
class LocalCycle:
    """One LR/momentum cycle over the `steps_per_batch` steps spent on each stream batch (see the module docstring).

    `pct_start` None means 0.5, or 0.25 when `steps_per_batch >= 50`; a value given wins. It must leave the warm-up
    more than one step (`pct_start * steps_per_batch > 1`), so the first step is at `max_lr / div_factor`, and be
    below 1, so the cycle anneals."""

    max_lr: float
    steps_per_batch: int
    pct_start: float | None = None
    div_factor: float = 10.0
    final_div_factor: float = 1e4
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self) -> None:
        if not self.max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {self.max_lr}")
        if isinstance(self.steps_per_batch, bool) or not isinstance(self.steps_per_batch, int) \
                or self.steps_per_batch < 2:
            raise ValueError(f"steps_per_batch must be an integer >= 2, got {self.steps_per_batch!r}")
        if self.pct_start is not None and not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start}")
        # (the default pct_start too: 0.5 x 2 steps is a one-step warm-up, which the cycle cannot shape)
        if not self.warmup_fraction * self.steps_per_batch > 1:
            raise ValueError(f"pct_start x steps_per_batch must be > 1 (a warm-up of more than one step), got "
                             f"pct_start={self.warmup_fraction} with steps_per_batch={self.steps_per_batch}")
        if not self.div_factor > 0:
            raise ValueError(f"div_factor must be > 0, got {self.div_factor}")
        if not self.final_div_factor > 0:
            raise ValueError(f"final_div_factor must be > 0, got {self.final_div_factor}")
        if not 0 <= self.base_momentum < 1:
            raise ValueError(f"base_momentum must be in [0, 1), got {self.base_momentum}")
        if not self.base_momentum <= self.max_momentum < 1:
            raise ValueError(f"max_momentum must be in [base_momentum, 1), got {self.max_momentum} "
                             f"(base_momentum {self.base_momentum})")

    # ---------------------------------------------------------------- the cycle's shape
    @property
    def warmup_fraction(self) -> float:
        """`pct_start` as given, else the default for this cycle length."""
        return self._fraction_at(self.steps_per_batch)

    @property
    def min_steps(self) -> int:
        """The shortest cycle with these factors: the fewest steps (>= 2) that leave a warm-up of more than one."""
        n = 2
        while not self._fraction_at(n) * n > 1 and n < self.steps_per_batch:
            n += 1
        return n

    def _fraction_at(self, steps: int) -> float:
        if self.pct_start is not None:
            return self.pct_start
        return LONG_CYCLE_PCT_START if steps >= LONG_CYCLE_STEPS else SHORT_CYCLE_PCT_START

    def fitted(self, steps: int) -> LocalCycle:
        """The same cycle over `steps` steps (raised to `min_steps`; this cycle itself when `steps` is its length)."""
        steps = max(int(steps), self.min_steps)
        return self if steps == self.steps_per_batch else replace(self, steps_per_batch=steps)

    @property
    def initial_lr(self) -> float:
        return self.max_lr / self.div_factor

    @property
    def final_lr(self) -> float:
        return self.initial_lr / self.final_div_factor

    def _phase(self, step_in_batch: int) -> tuple[bool, float]:
        """(in the warm-up?, progress through that phase in [0, 1]) at `step_in_batch`, with torch's boundaries."""
        if isinstance(step_in_batch, bool) or not isinstance(step_in_batch, int) \
                or not 0 <= step_in_batch < self.steps_per_batch:
            raise ValueError(f"step_in_batch must be an integer in [0, {self.steps_per_batch}), got {step_in_batch!r}")
        warmup_end = float(self.warmup_fraction * self.steps_per_batch) - 1
        if step_in_batch <= warmup_end:
            return True, step_in_batch / warmup_end
        cycle_end = self.steps_per_batch - 1
        return False, (step_in_batch - warmup_end) / (cycle_end - warmup_end)

    # ---------------------------------------------------------------- values
    def lr(self, step_in_batch: int) -> float:
        warming, pct = self._phase(step_in_batch)
        if warming:
            return _cos_anneal(self.initial_lr, self.max_lr, pct)
        return _cos_anneal(self.max_lr, self.final_lr, pct)

    def momentum(self, step_in_batch: int) -> float:
        warming, pct = self._phase(step_in_batch)
        if warming:
            return _cos_anneal(self.max_momentum, self.base_momentum, pct)
        return _cos_anneal(self.base_momentum, self.max_momentum, pct)

    def apply(self, optimizer: torch.optim.Optimizer, step_in_batch: int) -> None:
        """Set the LR and momentum of step `step_in_batch` on every group of `optimizer`.

        The LR goes through `trainers.optim.set_lr`, so the engine's group keys hold (a `fixed_lr` group keeps its
        LR, `lr_scale` scales it). The momentum is a group's `momentum` (SGD, this repo's LARS) or the first of its
        `betas` (Adam, AdamW); a group with neither is an error, as it is for torch's OneCycleLR."""
        lr, momentum = self.lr(step_in_batch), self.momentum(step_in_batch)
        for i, group in enumerate(optimizer.param_groups):
            if "betas" not in group and "momentum" not in group:
                raise ValueError(f"LocalCycle.apply: param group {i} of {type(optimizer).__name__} has neither "
                                 f"'momentum' nor 'betas' to cycle")
        set_lr(optimizer, lr)
        for group in optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum


__all__ = ["LocalCycle"]
