"""A bounded buffer of past chunks' rows, sharded over DDP ranks: the state replay and LUMP share.

Rows of the chunk being trained are *staged* while its first epoch streams by (a reservoir over that chunk, so
repeated epochs, and the repeated passes of a class-subsampled chunk (`Batch.repeated`), do not add duplicates) and join the buffer only when the chunk ends: the buffer holds the past,
never the present. Merging keeps

* ``reservoir``: a uniform sample of every row seen so far (each chunk's share proportional to its rows);
* ``balanced``: an equal share per past chunk.

Rows are stored as the stream delivered them (uint8 images, labels, row ids, domains) on the CPU, so a strategy
that draws them (`draw`) augments them afresh every time.

Under DDP each rank holds a shard (`size` split over the ranks) filled from the rows that rank trained on, so
the union of the shards is the buffer: nothing is stored twice. A checkpoint holds every rank's shard; a resume
with another world size deals the union out again. The ranks draw from their buffer only when *every* shard has
rows (`drawable`, agreed by one all-reduce each time the buffer changes): a step's cross-rank gathers need the same
rows on every rank, and a rank whose shard is empty (a buffer smaller than the world, which the spec refuses; a
resume onto more ranks than rows) would otherwise train on fewer rows than the others and hang or crash them.
Every rank then draws the same count per step.

`RowBuffer` is a `Strategy` that implements the buffer's hooks (`setup`, `after_step`, `on_chunk_end`, state);
a strategy using the rows subclasses it and adds how they are used (replay: `prepare_batch`; LUMP:
`prepare_views`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor

from trainers.config import ComponentConfig
from trainers.engine.distributed import world
from trainers.engine.types import Batch, StepContext
from trainers.strategies.base import ChunkEnd, Strategy

_FIELDS = ("images", "labels", "index", "domain", "chunk")


class BufferConfig(ComponentConfig):
    """The options every buffered strategy has (its own Config adds what it does with the rows)."""

    size: int = Field(2000, ge=1, description="rows the buffer holds, over all workers together")
    policy: Literal["reservoir", "balanced"] = Field(
        "reservoir", description="reservoir: a uniform sample of all rows seen; balanced: an equal share per chunk"
    )
    seed: int = Field(0, description="seed of the buffer's sampling (each rank offsets it by its rank)")


def _empty() -> dict[str, Tensor]:
    return {name: torch.empty(0, dtype=torch.uint8 if name == "images" else torch.int64) for name in _FIELDS}


def _rows(store: dict[str, Tensor], keep: Tensor | slice) -> dict[str, Tensor]:
    return {name: value[keep] for name, value in store.items()}


def _cat(stores: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    filled = [s for s in stores if len(s["index"])]
    if not filled:
        return _empty()
    return {name: torch.cat([s[name] for s in filled]) for name in _FIELDS}


class RowBuffer(Strategy):
    """See the module docstring. `size`, `policy`, `seed`: `BufferConfig` (validated by the subclass's Config)."""

    name = "buffer"

    def __init__(self, size: int = 2000, policy: str = "reservoir", seed: int = 0) -> None:
        self.size, self.policy, self.seed = size, policy, seed
        self.rank, self.world_size = 0, 1
        self.buffer = _empty()  # past chunks' rows (this rank's shard)
        self.staged = _empty()  # the current chunk's reservoir
        self.staged_seen = 0  # rows of the current chunk offered to the reservoir
        self.rows_seen = 0  # rows of finished chunks this rank trained on
        self.generator = torch.Generator().manual_seed(self.seed)
        self._drawable: bool | None = None  # every rank's shard has rows; None: ask the ranks again

    # ---------------------------------------------------------------- placement
    def setup(self, rank: int, world_size: int) -> None:
        if (rank, world_size) != (self.rank, self.world_size):
            self.rank, self.world_size = rank, world_size
            self._drawable = None
            self.generator.manual_seed(self.seed * 1_000_003 + rank)

    @property
    def capacity(self) -> int:
        """This rank's share of `size` (the shares sum to `size`)."""
        return self.size // self.world_size + (1 if self.rank < self.size % self.world_size else 0)

    def __len__(self) -> int:
        return len(self.buffer["index"])

    # ---------------------------------------------------------------- drawing
    def drawable(self, device: torch.device) -> bool:
        """Whether every rank's shard has rows, so every rank can draw the same count this step. Under
        torch.distributed a collective (one all-reduce on `device` each time the buffer changed): every rank must
        call it at the same step, whatever its own shard holds."""
        if self._drawable is None:
            have = torch.tensor([1 if len(self) else 0], dtype=torch.int64, device=device)
            if world()[1] > 1:
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
            self._drawable = bool(have.item())
        return self._drawable

    def draw(self, count: int, device: torch.device) -> Batch:
        """`count` buffer rows drawn uniformly with replacement, as a Batch on `device` (the buffer must not be
        empty)."""
        picks = torch.randint(len(self), (count,), generator=self.generator)
        rows = _rows(self.buffer, picks)
        return Batch(*(rows[name].to(device, non_blocking=True) for name in ("images", "labels", "index", "domain")))

    # ---------------------------------------------------------------- filling
    def after_step(self, batch: Batch, ctx: StepContext) -> None:
        if ctx.epoch != 0 or batch.repeated:  # repeats of the chunk's rows: the first pass has offered them all
            return
        self._stage(batch, ctx.chunk)

    def _stage(self, batch: Batch, chunk: int) -> None:
        """Reservoir sampling (Vitter's algorithm R) of the chunk's rows into `staged`, one batch at a time."""
        capacity, n = self.capacity, len(batch)
        free = max(0, capacity - len(self.staged["index"]))
        take_free = torch.arange(min(free, n))
        # Row i of the rest is the (seen + i + 1)-th row offered: it replaces a random slot with prob cap / that.
        rest = torch.arange(len(take_free), n)
        positions = self.staged_seen + rest + 1
        draws = (torch.rand(len(rest), generator=self.generator) * positions).long()
        accepted = draws < capacity
        self.staged_seen += n
        if len(take_free) == 0 and not accepted.any():
            return
        chosen = torch.cat([take_free, rest[accepted]])
        rows = {  # only the chosen rows leave the device
            "images": batch.images[chosen.to(batch.images.device)].cpu(),
            "labels": batch.labels[chosen.to(batch.labels.device)].cpu(),
            "index": batch.index[chosen.to(batch.index.device)].cpu(),
            "domain": batch.domain[chosen.to(batch.domain.device)].cpu(),
            "chunk": torch.full((len(chosen),), chunk, dtype=torch.int64),
        }
        appended = len(take_free)
        if appended:
            self.staged = _cat([self.staged, _rows(rows, slice(0, appended))])
        slots = draws[accepted]
        for k, slot in enumerate(slots.tolist()):  # in order: a later row may replace an earlier one's slot
            for name in _FIELDS:
                self.staged[name][slot] = rows[name][appended + k]

    def on_chunk_end(self, end: ChunkEnd) -> None:
        new, old = self.staged, self.buffer
        n_new, n_old = len(new["index"]), len(old["index"])
        capacity = self.capacity
        if self.policy == "reservoir":
            total = self.rows_seen + self.staged_seen
            share = round(capacity * self.staged_seen / total) if total else 0
            k_new = min(n_new, max(capacity - n_old, share))
            k_old = min(n_old, capacity - k_new)
            self.buffer = _cat([_rows(old, self._subset(n_old, k_old)), _rows(new, self._subset(n_new, k_new))])
        else:  # balanced: every chunk seen so far gets an equal share
            merged = _cat([old, new])
            chunks = torch.unique(merged["chunk"]).tolist()
            quota, extra = divmod(capacity, max(1, len(chunks)))
            keep = []
            for i, chunk in enumerate(chunks):
                members = torch.nonzero(merged["chunk"] == chunk).flatten()
                take = min(len(members), quota + (1 if i < extra else 0))
                keep.append(members[self._subset(len(members), take)])
            self.buffer = _rows(merged, torch.cat(keep)) if keep else _empty()
        self.rows_seen += self.staged_seen
        self.staged, self.staged_seen = _empty(), 0
        self._drawable = None

    def _subset(self, n: int, k: int) -> Tensor:
        """`k` of `n` positions uniformly without replacement, in increasing order (the buffer keeps its order)."""
        return torch.randperm(n, generator=self.generator)[:k].sort().values

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": dict(self.buffer), "staged": dict(self.staged), "staged_seen": self.staged_seen,
                "rows_seen": self.rows_seen, "generator": self.generator.get_state(),
                "placement": (self.rank, self.world_size)}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        states = [s for s in states if s]
        if not states:
            return
        self.rank, self.world_size = rank, world_size
        self._drawable = None
        if len(states) == world_size and all(s["placement"] == (r, world_size) for r, s in enumerate(states)):
            own = states[rank]
            self.buffer, self.staged = dict(own["buffer"]), dict(own["staged"])
            self.staged_seen, self.rows_seen = own["staged_seen"], own["rows_seen"]
            self.generator.set_state(own["generator"])
            return
        # Another world size: deal the union of the shards out again, so no row is lost or held twice.
        for part in ("buffer", "staged"):
            union = _cat([s[part] for s in states])
            setattr(self, part, _rows(union, slice(rank, None, world_size)))
        self.staged_seen = sum(s["staged_seen"] for s in states) // world_size
        self.rows_seen = sum(s["rows_seen"] for s in states) // world_size
        self.generator.manual_seed(self.seed * 1_000_003 + rank)


__all__ = ["BufferConfig", "RowBuffer"]
