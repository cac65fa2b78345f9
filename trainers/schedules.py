"""Learning-rate schedules as small stateless objects: `schedule.lr(step) -> float`.

    schedule = WarmupCosine(peak=0.3, total_steps=1000, warmup_steps=100)
    for step in range(1000):
        set_lr(optimizer, schedule.lr(step))

A schedule is a pure function of the step it is given, so nothing needs saving in a checkpoint: resuming at step
s gives the LR an uninterrupted run had at s. Over a chunk, the loop passes the step inside the chunk and the
chunk's length; over a line (`cosine_line`), the step counted from the line's start and the line's planned total.

Warm-up: step i < warmup_steps gets `peak * (i + 1) / warmup_steps`, so the first step already moves and step
warmup_steps - 1 is at the peak; the decay starts at the peak on step warmup_steps. (The same as torch's
`LinearLR(start_factor=1/W, total_iters=W-1)` followed by `CosineAnnealingLR(T_max=total-W)` in a `SequentialLR`
with milestone W.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "cosine_line", "constant")
# What each schedule's step counts: the step inside the chunk, or the step from the line's start.
SCOPE = {"cosine": "chunk", "cosine_line": "line", "constant": "chunk"}


def _warmup(peak: float, step: int, warmup_steps: int) -> float:
    return peak * (step + 1) / warmup_steps


@dataclass(frozen=True)
class Constant:
    """`peak` after an optional linear warm-up."""

    peak: float
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(self.peak, step, self.warmup_steps)
        return self.peak


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to `peak`, then half a cosine from `peak` down to `final` over the remaining steps of
    `total_steps`; steps past the end stay at `final`. With `warmup_steps >= total_steps` it is all warm-up."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    final: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(self.peak, step, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(name: str, peak: float, total_steps: int, warmup_steps: int = 0) -> Constant | WarmupCosine:
    """The schedule `name` (one of `SCHEDULES`) over `total_steps` steps of its scope (`SCOPE[name]`).

    A warm-up longer than the schedule is allowed: the LR then never reaches the peak (a warm-up counts its own
    length, not the schedule's)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if name == "constant":
        return Constant(peak, warmup_steps)
    return WarmupCosine(peak, total_steps, warmup_steps)
