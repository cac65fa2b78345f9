"""The options of online training (the spec's `online:` section validates against this model).

    cfg = OnlineConfig.parse("online", steps_per_batch=20, rals=True, memory_size=5000)
    cfg.memory_draw   # 256: the memory rows drawn per step (128 without RALS) unless memory_batch is given
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainers.config import ComponentConfig


class OnlineConfig(ComponentConfig):
    """How each stream batch is learned from: steps, LR cycle, replay memory, RALS and the time budget."""

    batch_size: int = Field(128, ge=2, description="rows per stream batch b (over all workers together)")
    steps_per_batch: int = Field(10, ge=1, description="optimizer steps on each stream batch (10, 20, 50, 100)")
    schedule: Literal["local_cycle", "constant"] = Field(
        "local_cycle", description="local_cycle: a one-cycle LR and momentum restarted with every stream batch "
                                   "(SLCLRS); constant: max_lr throughout (the baseline)")
    max_lr: float = Field(0.3, gt=0, allow_inf_nan=False, description="peak LR of each batch's cycle")
    pct_start: float | None = Field(
        None, gt=0, lt=1, description="share of a batch's steps spent rising to max_lr; default 0.5, or 0.25 at "
                                      ">= 50 steps per batch")
    div_factor: float = Field(10.0, ge=1, allow_inf_nan=False, description="a cycle starts at max_lr / div_factor")
    final_div_factor: float = Field(1e4, ge=1, allow_inf_nan=False,
                                    description="a cycle ends at (max_lr / div_factor) / final_div_factor")
    base_momentum: float = Field(0.85, ge=0, lt=1, description="momentum at the cycle's LR peak")
    max_momentum: float = Field(0.95, ge=0, lt=1, description="momentum at the cycle's start and end")
    memory_size: int = Field(2000, ge=0, description="rows the replay memory holds over all workers (0: none)")
    memory_batch: int | None = Field(
        None, ge=1, description="memory rows drawn per step and memory batch; default 256 with RALS, else 128")
    memory_batches: int = Field(1, ge=1, description="memory batches joined to the stream batch at every step")
    rals: bool = Field(False, description="Reducible Anchor Loss Selection: train on the k candidates whose loss "
                                          "rose most against the model frozen at the batch's start")
    rals_k: int = Field(256, ge=1, description="candidates RALS trains on per step (over all workers)")
    rals_part_size: int = Field(16, ge=2, description="rows per part for methods selected by whole parts "
                                                      "(Barlow Twins)")
    time_budget_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="seconds each stream batch may take before the next one "
                                                     "arrives; None: the stream waits for training")
    late_policy: Literal["drop", "queue"] = Field(
        "drop", description="a batch still training when the next arrives: drop its remaining steps, or finish "
                            "them and queue the next batch")
    cycle_fit: Literal["measured", "planned"] = Field(
        "measured", description="with time_budget_s, late_policy drop and local_cycle: measured sizes each batch's "
                                "LR cycle to the steps that fit before the next batch (from the measured step time), "
                                "so it anneals; planned keeps steps_per_batch and the deadline cuts the cycle short")
    seed: int = Field(0, description="seed of memory sampling and RALS's part permutation")

    @model_validator(mode="after")
    def _a_cycle_that_works(self) -> OnlineConfig:
        if self.base_momentum > self.max_momentum:
            raise ValueError(f"base_momentum ({self.base_momentum}) must not exceed max_momentum "
                             f"({self.max_momentum})")
        if self.schedule == "local_cycle":  # its own checks (>= 2 steps, a warm-up of more than one step), here
            from trainers.online.schedule import LocalCycle

            LocalCycle(self.max_lr, self.steps_per_batch, pct_start=self.pct_start, div_factor=self.div_factor,
                       final_div_factor=self.final_div_factor, base_momentum=self.base_momentum,
                       max_momentum=self.max_momentum)
        return self

    def uneven_shares(self, workers: int, what: str = "the workers") -> list[str]:
        """What cannot be dealt evenly over `workers`: each worker draws `memory_draw / workers` memory rows per
        memory batch and trains on `rals_k / workers` RALS rows per step, the same on every worker (the
        cross-worker gathers of a step need equal shapes). Empty when everything divides."""
        counts = {}
        if self.memory_size:
            default = "" if self.memory_batch else f", the default {'with' if self.rals else 'without'} rals"
            counts["memory_batch"] = (self.memory_draw, default)
        if self.rals:
            counts["rals_k"] = (self.rals_k, "")
        problems = []
        for field, (total, note) in counts.items():
            if total % workers:
                low = total - total % workers
                use = " or ".join(str(v) for v in (low, low + workers) if v > 0)
                problems.append(f"online.{field} ({total}{note}) must be divisible by {what} ({workers}): every "
                                f"worker takes the same share of it (the cross-worker gathers need equal shapes); "
                                f"use {use}")
        return problems

    @property
    def memory_draw(self) -> int:
        """Memory rows drawn per memory batch and step."""
        return self.memory_batch or (256 if self.rals else 128)
