"""The replay memory of online SSL: a fixed-size uniform reservoir over every stream row seen, sharded over DDP ranks.

    memory = ReplayMemory(size=5000, seed=0)
    memory.setup(rank, world_size)                 # before the first add
    for stream_batch in stream:
        memory.add(stream_batch)                   # reservoir sampling (Vitter's algorithm R)
        for step in range(steps_per_batch):
            past = memory.draw(128)                # a Batch of stored rows, or None while the memory is empty
            ...train on stream_batch.cat(past.to(device))...

Unlike `trainers.strategies.buffer.RowBuffer`, which holds past chunks only, the memory takes rows as they arrive:
a stream has no chunks, so after any number of rows every row seen is held with the same probability,
`capacity / seen` (the first rows no more or less likely than the latest, so old batches survive). Rows are stored
as the stream delivered them (uint8 images, labels, row ids, domains; the buffer's layout) on the CPU, so every draw
augments them afresh.

Under DDP each rank holds a shard of `size // world + (rank < size % world)` rows, a reservoir over the rows that
rank received: the union of the shards is the memory, and nothing is stored twice. A checkpoint holds every rank's
state once (`state_dict` per rank, each rank's in its own file: `orchestrator.train.online_checkpoint`);
`load_state_dict` takes the list in rank order, where a resume in the same placement needs only this rank's rows
(the others' entries may carry their placement, size and count alone); a resume with another world size deals the
union out again (see `load_state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trainers.engine.types import Batch

_FIELDS = ("images", "labels", "index", "domain")  # the Batch fields a row keeps


def _empty() -> dict[str, Tensor]:
    return {name: torch.empty(0, dtype=torch.uint8 if name == "images" else torch.int64) for name in _FIELDS}


def _cat(stores: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    filled = [s for s in stores if len(s["index"])]
    if not filled:
        return _empty()
    return {name: torch.cat([s[name] for s in filled]) for name in _FIELDS}


def _share(total: int, rank: int, world_size: int) -> int:
    """Rank `rank`'s part of `total` dealt over `world_size` ranks (the parts sum to `total`)."""
    return total // world_size + (1 if rank < total % world_size else 0)


class ReplayMemory:
    """See the module docstring. `size`: rows over all ranks together; `seed`: of the sampling (each rank offsets
    it by its rank)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        self.size, self.seed = size, seed
        self.rank, self.world_size = 0, 1
        self.rows = _empty()  # this rank's shard
        self.seen = 0  # stream rows offered to this rank's reservoir
        self.generator = torch.Generator().manual_seed(self._rank_seed())

    def _rank_seed(self) -> int:
        return self.seed * 1_000_003 + self.rank

    # ---------------------------------------------------------------- placement
    def setup(self, rank: int, world_size: int) -> None:
        """Place the memory on `rank` of `world_size` (call before the first `add`; a resume goes through
        `load_state_dict`, which places it too)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        if (rank, world_size) != (self.rank, self.world_size):
            self.rank, self.world_size = rank, world_size
            self.generator.manual_seed(self._rank_seed())

    @property
    def capacity(self) -> int:
        """This rank's share of `size` (the shares sum to `size`)."""
        return _share(self.size, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.rows["index"])

    @property
    def nbytes(self) -> int:
        """Bytes the stored rows take (host memory), for resource accounting."""
        return sum(t.element_size() * t.numel() for t in self.rows.values())

    # ---------------------------------------------------------------- filling
    def add(self, batch: Batch) -> None:
        """Offer the batch's rows to the reservoir, in order; rows the reader repeats (`Batch.repeated`) were
        offered on their first pass and are skipped.

        Algorithm R row by row: while there is room a row is kept; after that the row offered as number n (0-based
        over this rank's rows) draws j uniform in [0, n] and replaces slot j if j < capacity. Here the draws of the
        whole batch are made at once and the replacements scattered together; where several rows of the batch
        land on the same slot the last wins, as it would row by row."""
        if batch.repeated or len(batch) == 0:
            return
        n, capacity = len(batch), self.capacity
        n_free = min(n, max(0, capacity - len(self)))
        rest = torch.arange(n_free, n)
        offered_as = self.seen + rest  # 0-based position of each remaining row in this rank's stream
        # float64 keeps j uniform for streams far longer than float32's 2^24 steps could resolve.
        draws = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * (offered_as + 1)).long()
        accepted = draws < capacity
        self.seen += n
        slots, replacing = draws[accepted], rest[accepted]
        if len(slots):  # keep only the last row aimed at each slot
            targets, owner = torch.unique(slots, return_inverse=True)
            last = torch.full((len(targets),), -1, dtype=torch.int64).scatter_reduce(
                0, owner, torch.arange(len(slots)), reduce="amax")
            slots, replacing = targets, replacing[last]
        chosen = torch.cat([torch.arange(n_free), replacing])
        if len(chosen) == 0:
            return
        picked = {name: getattr(batch, name)[chosen.to(batch.images.device)].cpu() for name in _FIELDS}
        if n_free:  # the free slots fill in order, before any replacement (which may hit them)
            self.rows = _cat([self.rows, {name: value[:n_free] for name, value in picked.items()}])
        if len(slots):
            for name in _FIELDS:
                self.rows[name][slots] = picked[name][n_free:]

    # ---------------------------------------------------------------- drawing
    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Batch | None:
        """`n` stored rows as a Batch (on the CPU, or on `device`), or None while the memory is empty.

        Uniform over the stored rows: without replacement when `n <= len(self)`, with replacement otherwise (a
        small early memory still fills the batch). `generator` draws instead of the memory's own (which the
        reservoir also uses), e.g. to keep the draws independent of how many rows arrived."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if len(self) == 0:
            return None
        generator = generator if generator is not None else self.generator
        if n <= len(self):
            picks = torch.randperm(len(self), generator=generator)[:n]
        else:
            picks = torch.randint(len(self), (n,), generator=generator)
        batch = Batch(*(self.rows[name][picks] for name in _FIELDS))
        return batch if device is None else batch.to(device, non_blocking=True)

    @property
    def index(self) -> Tensor:
        """The row ids this rank stores (a copy)."""
        return self.rows["index"].clone()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """This rank's state. Its row tensors are the memory's own (no copy of a memory that may be gigabytes):
        save or copy it before the next `add` overwrites slots in place."""
        return {"rows": dict(self.rows), "seen": self.seen, "size": self.size,
                "generator": self.generator.get_state(), "placement": (self.rank, self.world_size)}

    def load_state_dict(self, states: Sequence[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
        """Resume from every rank's `state_dict` (a list in rank order), as `rank` of `world_size`.

        The same placement as saved: this rank takes its own shard, count and generator back, so the run goes on
        exactly as it would have. Another world size (or another `size`): the union of the shards is permuted with
        a generator seeded by `seed` alone (so every rank computes the same permutation) and dealt out, rank r
        taking every world_size-th row from r, at most its new capacity; `seen` is the total over the saved ranks
        dealt out the same way, so the totals stay. Each rank's reservoir then goes on from its share: the union
        stays a uniform sample of the stream if the memory was full (or holds every row if it was not), and a
        smaller `size` keeps a uniform subset. The generators restart from the seed and the new rank.

        In the same placement only this rank's entry needs its "rows" and "generator": the others' may hold just
        "placement", "size" and "seen" (a checkpoint's shares are read by their own ranks alone)."""
        states = [s for s in states if s]
        if not states:
            return
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        exact = len(states) == world_size and all(
            s["placement"] == (r, world_size) and s["size"] == self.size for r, s in enumerate(states))
        if exact:
            own = states[rank]
            self.rows = {name: value.clone() for name, value in own["rows"].items()}  # adds write in place
            self.seen = own["seen"]
            self.generator.set_state(own["generator"])
            return
        if any("rows" not in s for s in states):
            raise ValueError("the memory is dealt out again (another world size or size), which needs every rank's "
                             "rows; some states hold only their placement")
        union = _cat([s["rows"] for s in states])
        order = torch.randperm(len(union["index"]), generator=torch.Generator().manual_seed(self.seed))
        mine = order[rank::world_size][:self.capacity]
        self.rows = {name: value[mine] for name, value in union.items()}
        self.seen = _share(sum(s["seen"] for s in states), rank, world_size)
        self.generator.manual_seed(self._rank_seed())


__all__ = ["ReplayMemory"]
