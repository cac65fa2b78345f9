"""The online replay memory: a bounded uniform reservoir over every stream row, sharded over ranks, resumed exactly."""

from __future__ import annotations

import io

import pytest
import torch
from scipy import stats

from tests.trainers.ddp_harness import run_ddp
from trainers.engine.types import Batch
from trainers.online.memory import ReplayMemory


def rows(start: int, n: int, size: int = 2) -> Batch:
    """n rows whose index is start..start+n-1 and whose pixels and label encode it (a mix-up of fields shows)."""
    index = torch.arange(start, start + n)
    images = (index % 251).to(torch.uint8).view(-1, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return Batch(images, labels=index % 10, index=index, domain=index % 3)


def stream(memory: ReplayMemory, sizes: list[int], start: int = 0) -> int:
    for n in sizes:
        memory.add(rows(start, n))
        start += n
    return start


def assert_rows_consistent(memory: ReplayMemory) -> None:
    index = memory.rows["index"]
    assert torch.equal(memory.rows["images"][:, 0, 0, 0], (index % 251).to(torch.uint8))
    assert torch.equal(memory.rows["labels"], index % 10) and torch.equal(memory.rows["domain"], index % 3)


def test_never_exceeds_its_bound_and_old_batches_survive(one_torch_thread) -> None:
    memory = ReplayMemory(size=64, seed=1)
    start, generator = 0, torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 90, (1,), generator=generator))
        start = stream(memory, [n], start)
        assert len(memory) == min(start, 64) and memory.seen == start
    assert len(set(memory.index.tolist())) == 64  # every slot a distinct row
    assert (memory.index < start // 4).any()  # rows of the first quarter of the stream are still held (not FIFO)
    assert_rows_consistent(memory)
    assert memory.nbytes == 64 * (3 * 2 * 2 + 3 * 8)


def test_the_batched_reservoir_equals_algorithm_r_row_by_row(one_torch_thread) -> None:
    """The same random numbers applied one row at a time give the same memory (later rows win a shared slot)."""
    capacity, sizes = 10, [4, 3, 40, 1, 25, 200, 7]
    memory = ReplayMemory(size=capacity, seed=3)
    stream(memory, sizes)
    generator = torch.Generator().manual_seed(3 * 1_000_003)
    slots: list[int] = []
    seen = 0
    for n in sizes:  # draws are made for the rows past the free room, as the memory makes them
        free = max(0, capacity - len(slots))
        u = torch.rand(n - min(n, free), generator=generator, dtype=torch.float64).tolist()
        for i in range(n):
            if len(slots) < capacity:
                slots.append(seen)
            else:
                j = int(u[i - min(n, free)] * (seen + 1))
                if j < capacity:
                    slots[j] = seen
            seen += 1
    assert memory.index.tolist() == slots


def test_every_row_is_kept_with_the_same_probability(one_torch_thread) -> None:
    """1000 rows through a memory of 100, over 300 seeds: each row is held in ~10% of the runs, early or late."""
    n_rows, size, runs = 1000, 100, 300
    counts = torch.zeros(n_rows)
    sizes = [1, 9, 90, 150, 250, 500]  # a batch bigger than the memory, many rows aimed at the same slot
    for seed in range(runs):
        memory = ReplayMemory(size=size, seed=seed)
        stream(memory, sizes)
        assert len(memory) == size
        counts[memory.index] += 1
    expected = runs * size / n_rows
    # Inclusions are Binomial(runs, 0.1) per row (slightly less spread than chi-square assumes: conservative).
    assert stats.chisquare(counts.numpy(), [expected] * n_rows).pvalue > 0.01
    for part in counts.view(10, 100):  # each tenth of the stream: mean inclusion ~0.1 (sd ~0.0017)
        assert abs(part.mean().item() / runs - 0.1) < 0.01


def test_draw_returns_stored_rows_without_then_with_replacement(one_torch_thread) -> None:
    memory = ReplayMemory(size=50, seed=0)
    assert memory.draw(8) is None
    stream(memory, [30])
    batch = memory.draw(20)
    assert isinstance(batch, Batch) and batch.images.shape == (20, 3, 2, 2) and batch.images.dtype == torch.uint8
    assert len(set(batch.index.tolist())) == 20 and set(batch.index.tolist()) <= set(memory.index.tolist())
    assert torch.equal(batch.images[:, 0, 0, 0], (batch.index % 251).to(torch.uint8))
    many = memory.draw(64)  # more than it holds: with replacement
    assert len(many) == 64 and set(many.index.tolist()) <= set(memory.index.tolist())
    own = torch.Generator().manual_seed(5)
    assert torch.equal(memory.draw(16, generator=own).index,
                       memory.draw(16, generator=torch.Generator().manual_seed(5)).index)
    with pytest.raises(ValueError, match="n must"):
        memory.draw(0)


def test_state_round_trip_keeps_contents_and_future_draws(one_torch_thread) -> None:
    memory = ReplayMemory(size=40, seed=2)
    end = stream(memory, [25, 25, 25])
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    resumed = ReplayMemory(size=40, seed=2)
    resumed.load_state_dict([torch.load(buffer, weights_only=False)])
    assert torch.equal(resumed.index, memory.index) and resumed.seen == memory.seen == 75
    for memo in (memory, resumed):
        stream(memo, [30, 30], start=end)
    assert torch.equal(resumed.index, memory.index)
    assert torch.equal(resumed.draw(16).index, memory.draw(16).index)


def test_two_rank_shards_hold_their_own_rows_and_resume_on_one(one_torch_thread) -> None:
    shards = [ReplayMemory(size=101, seed=4) for _ in range(2)]
    for rank, memo in enumerate(shards):
        memo.setup(rank, 2)
        for s in range(rank * 100, 4000, 200):  # rank r gets rows [r*100, r*100+100) of every 200
            memo.add(rows(s, 100))
    assert [m.capacity for m in shards] == [51, 50] and sum(len(m) for m in shards) == 101
    for rank, memo in enumerate(shards):
        assert ((memo.index // 100) % 2 == rank).all()
    states = [m.state_dict() for m in shards]
    whole = ReplayMemory(size=101, seed=4)
    whole.load_state_dict(states, rank=0, world_size=1)
    assert sorted(whole.index.tolist()) == sorted(shards[0].index.tolist() + shards[1].index.tolist())
    assert whole.seen == 4000 and len(whole) == whole.capacity == 101
    assert_rows_consistent(whole)
    # And back out to 3 ranks: the deal covers the union once, with the seen totals kept.
    thirds = [ReplayMemory(size=101, seed=4) for _ in range(3)]
    for rank, memo in enumerate(thirds):
        memo.load_state_dict([whole.state_dict()], rank=rank, world_size=3)
    assert sorted(sum((m.index.tolist() for m in thirds), [])) == sorted(whole.index.tolist())
    assert [len(m) for m in thirds] == [34, 34, 33] and sum(m.seen for m in thirds) == 4000


def test_a_smaller_size_on_resume_keeps_a_subset() -> None:
    memory = ReplayMemory(size=30, seed=0)
    stream(memory, [100])
    smaller = ReplayMemory(size=12, seed=0)
    smaller.load_state_dict([memory.state_dict()])
    assert len(smaller) == 12 and set(smaller.index.tolist()) <= set(memory.index.tolist())


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": 2.5}])
def test_bad_size_is_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="size"):
        ReplayMemory(**kwargs)


def _ddp_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    memory = ReplayMemory(size=75, seed=7)
    memory.setup(dist.get_rank(), dist.get_world_size())
    for s in range(0, 1200, 60):  # each rank receives its half of every global batch of 60
        memory.add(rows(s + rank * 30, 30))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, memory.state_dict())
    whole = ReplayMemory(size=75, seed=7)
    whole.load_state_dict(gathered, rank=0, world_size=1)
    return {"index": memory.index, "capacity": memory.capacity, "union": whole.index}


def test_ddp_shards_are_disjoint_and_fill_the_memory() -> None:
    ranks = run_ddp(_ddp_worker)
    index = torch.cat([r["index"] for r in ranks])
    assert [r["capacity"] for r in ranks] == [38, 37] and len(index) == 75
    assert len(set(index.tolist())) == 75  # nothing stored twice
    for rank, r in enumerate(ranks):
        assert ((r["index"] // 30) % 2 == rank).all()  # only the rows that rank was given
    assert sorted(ranks[0]["union"].tolist()) == sorted(index.tolist())
