"""Replay: a fixed-size buffer of past chunks' rows, mixed into every batch of the next chunks.

The buffer (`trainers.strategies.buffer.RowBuffer`: staged during a chunk, merged at its end, sharded over DDP
ranks, re-dealt on a new world size) holds the past, never the present. Each step appends ``round(ratio x B)``
buffer rows, drawn uniformly with replacement, to the stream's B rows (so ``ratio`` 1 makes half of every mixed
batch replay); the method augments replayed rows afresh with the stream's.

Replay composes with `sequential` only: `joint` trains on every past chunk already, so replaying them again only
reweights the past (`joint+replay` is refused by the stack and by the spec).
"""

from __future__ import annotations

from pydantic import Field

from trainers.engine.types import Batch, StepContext
from trainers.strategies.buffer import BufferConfig, RowBuffer


class ReplayConfig(BufferConfig):
    """The spec's `strategy.replay` options."""

    ratio: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False,
        description="buffer rows mixed into each batch per stream row (1: half of every mixed batch is replay)",
    )


class Replay(RowBuffer):
    """See the module docstring. Options: `ReplayConfig`."""

    name = "replay"
    bases = ("sequential",)

    def __init__(self, size: int = 2000, ratio: float = 0.5, policy: str = "reservoir", seed: int = 0) -> None:
        cfg = ReplayConfig.parse("replay", size=size, ratio=ratio, policy=policy, seed=seed)
        super().__init__(cfg.size, cfg.policy, cfg.seed)
        self.ratio = cfg.ratio

    def prepare_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        count = round(self.ratio * len(batch))  # the same on every rank: DDP ranks get equal batches
        if count == 0 or not self.drawable(batch.images.device):  # some rank has no past rows yet
            return batch
        return batch.cat(self.draw(count, batch.images.device))


__all__ = ["Replay", "ReplayConfig"]
