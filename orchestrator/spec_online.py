"""The spec's `online:` section (stream kind `online`): how the stream is cut and delivered, and how each stream
batch is learned from (the trainer's `OnlineConfig`, extended with what the orchestrator does).

    stream: {kind: online, chunks: 5}      # T tasks
    online: {order: class_incremental, batch_size: 128, steps_per_batch: 20, rals: true, segment_batches: 10}

The order is `instance` (the rows in a seeded random order) or `class_incremental` (the classes in a seeded
order cut into T tasks, each task's rows in a seeded order); it is cut into stream batches of `batch_size` rows.
Every `segment_batches` batches the workers checkpoint and the driver evaluates: a segment, with its own run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainers.online.config import OnlineConfig


# What an online line may be: sequential, or CaSSLe's distillation from the model frozen at each task's end.
ONLINE_STRATEGIES = ("sequential", "sequential+cassle")


class OnlineSpec(OnlineConfig):
    order: Literal["instance", "class_incremental"] = Field(
        "class_incremental", description="instance: rows in a seeded random order; class_incremental: T tasks of "
                                         "classes (stream.chunks) one after another")
    segment_batches: int = Field(
        10, ge=1, description="stream batches per segment: each ends with a checkpoint and an evaluation (kNN/linear "
                              "against the stream batches seen)")
    checkpoint_every_batches: int | None = Field(
        None, ge=1, description="checkpoint every K stream batches inside a segment too (default: at segment ends)")
    max_batches: int | None = Field(
        None, ge=1, description="stop after this many stream batches (default: the order once; with cycle, required)")
    cycle: bool = Field(False, description="an unbounded stream: start the order again when it ends (needs "
                                           "max_batches, or run until stopped)")

    @model_validator(mode="after")
    def _checkpoints_inside_segments(self) -> OnlineSpec:
        if self.checkpoint_every_batches is not None and self.checkpoint_every_batches > self.segment_batches:
            raise ValueError(f"checkpoint_every_batches ({self.checkpoint_every_batches}) must not exceed "
                             f"segment_batches ({self.segment_batches}): a segment always ends with a checkpoint")
        return self


def online_problems(kind: str, online: OnlineSpec | None, strategies: list[str], workers: int) -> list[str]:
    """What makes the spec's online parts inconsistent (empty when nothing does)."""
    if kind != "online":
        return [] if online is None else ["online: only applies to stream.kind online"]
    problems = []
    other = [s for s in strategies if s not in ONLINE_STRATEGIES]
    if other:
        problems.append(f"lines.strategy: an online stream trains each line sequentially through the stream (its "
                        f"replay is online.memory_size), so only {list(ONLINE_STRATEGIES)} apply, got {other}")
    online = online or OnlineSpec()
    if online.batch_size % workers:
        problems.append(f"online.batch_size ({online.batch_size}) must be divisible by resources.workers ({workers})")
    if online.rals and online.rals_k >= online.batch_size + online.memory_batches * online.memory_draw:
        problems.append(f"online.rals_k ({online.rals_k}) must be below the candidates per step (stream batch "
                        f"{online.batch_size} + memory {online.memory_batches} x {online.memory_draw})")
    if online.cycle and online.max_batches is None:
        problems.append("online.cycle: an unbounded stream needs online.max_batches here (the driver stops there)")
    return problems
