"""The spec's `online:` section (stream kind `online`): how the stream is cut and delivered, and how each stream
batch is learned from (the trainer's `OnlineConfig`, extended with what the orchestrator does).

    stream: {kind: online, chunks: 5}      # T tasks
    online: {order: class_incremental, batch_size: 128, steps_per_batch: 20, rals: true, segment_batches: 10}

The order is `instance` (the rows in a seeded random order) or `class_incremental` (the classes in a seeded
order cut into T tasks, each task's rows in a seeded order); it is cut into stream batches of `batch_size` rows.
Every `segment_batches` batches the workers checkpoint and the driver evaluates: a segment, with its own run.

A live stream instead of the data set's train split (`orchestrator.data.online_source`):

    online: {source: {poll: s3://bucket/incoming/, interval_s: 2, stall_after_s: 30}}

The folder is polled for Parquet shards (the data set's shard schema; classes and domains from its manifest) that
have arrived: `NAME.parquet` counts once its completion sidecar `NAME.parquet.sha256` (the hex sha256 of the
shard's bytes) is there. A shard that fails its digest or cannot be read is skipped, named and counted; the stream
ends when no shard has arrived for `stall_after_s` seconds, or when the end marker is written.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from trainers.config import ComponentConfig
from trainers.online.config import OnlineConfig

# What an online line may be: sequential, or CaSSLe's distillation from the model frozen at each task's end.
ONLINE_STRATEGIES = ("sequential", "sequential+cassle")


class PollSource(ComponentConfig):
    """A folder or bucket prefix polled for new shards: the stream is its shards in the order they arrive."""

    poll: str = Field(min_length=1, description="folder or bucket prefix to poll (local path, file://, s3://, any "
                                                "fsspec URL) for NAME.parquet shards with a NAME.parquet.sha256 sidecar")
    interval_s: float = Field(2.0, gt=0, allow_inf_nan=False,
                              description="seconds between two listings while the stream waits for a shard")
    stall_after_s: float = Field(30.0, gt=0, allow_inf_nan=False,
                                 description="the stream ends when no shard has arrived for this long (from the "
                                             "start, or the last arrival); raise it for slow producers")
    grace_s: float = Field(60.0, ge=0, allow_inf_nan=False,
                           description="a shard whose sidecar is empty, partial or does not match the shard's bytes "
                                       "(caught mid-write) is tried again until this many seconds after it first "
                                       "showed; only what is still wrong then is skipped (0: skip at once)")
    end_marker: str = Field("_STREAM_END", min_length=1,
                            description="a file of this name in the folder ends the stream once the shards that "
                                        "arrived before it are learned (the producer's way to say it is done)")
    storage_options: dict[str, Any] = Field(default_factory=dict, strict=False,
                                            description="fsspec options for the polled URL (endpoint, credentials)")

    @model_validator(mode="after")
    def _stall_is_longer_than_a_poll(self) -> PollSource:
        if self.stall_after_s < self.interval_s:
            raise ValueError(f"stall_after_s ({self.stall_after_s}) must be at least interval_s ({self.interval_s}): "
                             "the stream must look at least once before it calls itself stalled")
        return self


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
    source: PollSource | None = Field(
        None, description="a live stream: poll this folder for new shards instead of reading the data set's train "
                          "split (the data set still gives the classes and the evaluation splits)")

    @model_validator(mode="after")
    def _checkpoints_inside_segments(self) -> OnlineSpec:
        if self.checkpoint_every_batches is not None and self.checkpoint_every_batches > self.segment_batches:
            raise ValueError(f"checkpoint_every_batches ({self.checkpoint_every_batches}) must not exceed "
                             f"segment_batches ({self.segment_batches}): a segment always ends with a checkpoint")
        return self


def online_problems(kind: str, online: OnlineSpec | None, strategies: list[str], workers: int,
                    lines: int = 1) -> list[str]:
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
    problems += online.uneven_shares(workers, "resources.workers")
    if online.rals and online.rals_k >= online.batch_size + online.memory_batches * online.memory_draw:
        problems.append(f"online.rals_k ({online.rals_k}) must be below the candidates per step (stream batch "
                        f"{online.batch_size} + memory {online.memory_batches} x {online.memory_draw})")
    if online.cycle and online.max_batches is None:
        problems.append("online.cycle: an unbounded stream needs online.max_batches here (the driver stops there)")
    if online.source is not None:
        if online.cycle:
            problems.append("online.cycle: a polled source (online.source) cannot start again; drop one of them")
        if online.time_budget_s is not None:
            problems.append("online.time_budget_s: a polled source (online.source) delivers batches as its shards "
                            "arrive, not on a clock; drop time_budget_s")
        if lines > 1:
            problems.append(f"online.source: a polled stream is learned live by one line, the plan has {lines} "
                            "(lines.method x lines.strategy); run one spec per line")
    return problems
