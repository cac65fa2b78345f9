"""Replay: a bounded, uniform buffer of past chunks' rows, mixed into batches, sharded over ranks, resumed exactly."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainers.engine.test_loop import Interrupted, config
from trainers.engine.checkpoint import load_state, save_state
from trainers.engine.loop import LineTrainer
from trainers.engine.types import Batch, StepContext
from trainers.strategies import ChunkEnd, Replay


def rows(start: int, n: int, size: int = 4) -> Batch:
    """n rows whose index is start..start+n-1 and whose pixels encode the index (a leak or mix-up shows)."""
    index = torch.arange(start, start + n)
    images = (index % 251).to(torch.uint8).view(-1, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return Batch(images, labels=index % 10, index=index, domain=torch.zeros(n, dtype=torch.int64))


def stream_chunk(replay: Replay, chunk: int, start: int, n: int, batch: int = 50, epochs: int = 1) -> None:
    for epoch in range(epochs):
        for s in range(start, start + n, batch):
            replay.after_step(rows(s, min(batch, start + n - s)), StepContext(step=0, total_steps=None, chunk=chunk,
                                                                              epoch=epoch))
    replay.on_chunk_end(ChunkEnd(method=None, chunk=chunk, batches=lambda: [], device=torch.device("cpu")))


def test_the_buffer_holds_past_rows_only_within_its_bound() -> None:
    replay = Replay(size=100, ratio=1.0)
    ctx = StepContext(step=0, total_steps=None, chunk=0)
    assert replay.prepare_batch(rows(0, 8), ctx).index.tolist() == list(range(8))  # nothing to replay yet
    for s in range(0, 1000, 50):
        replay.after_step(rows(s, 50), ctx)
        assert len(replay.staged["index"]) <= 100 and len(replay) == 0  # staged, not replayed during its chunk
    replay.on_chunk_end(ChunkEnd(method=None, chunk=0, batches=lambda: [], device=torch.device("cpu")))
    assert len(replay) == 100 and len(set(replay.buffer["index"].tolist())) == 100
    # Pixels travelled with their row ids.
    assert torch.equal(replay.buffer["images"][:, 0, 0, 0].long(), replay.buffer["index"] % 251)
    mixed = replay.prepare_batch(rows(5000, 8), StepContext(step=0, total_steps=None, chunk=1))
    assert len(mixed) == 16 and mixed.index[:8].tolist() == list(range(5000, 5008))
    assert set(mixed.index[8:].tolist()) <= set(replay.buffer["index"].tolist())
    assert torch.equal(mixed.labels, mixed.index % 10)
    half = Replay(size=100, ratio=0.25)
    stream_chunk(half, 0, 0, 200)
    assert len(half.prepare_batch(rows(5000, 8), ctx)) == 10


def test_later_epochs_do_not_stage_rows_twice() -> None:
    replay = Replay(size=500)
    stream_chunk(replay, 0, 0, 300, epochs=3)
    assert len(replay) == 300 and sorted(replay.buffer["index"].tolist()) == list(range(300))


def test_repeated_passes_of_a_cycled_epoch_do_not_stage_rows_twice() -> None:
    """data.class_fraction cycles a chunk's kept rows within an epoch; the reader marks the repeats."""
    replay = Replay(size=500)
    ctx = StepContext(step=0, total_steps=None, chunk=0, epoch=0)
    for repeat in (False, True, True):
        for s in range(0, 300, 50):
            replay.after_step(dataclasses.replace(rows(s, 50), repeated=repeat), ctx)
    replay.on_chunk_end(ChunkEnd(method=None, chunk=0, batches=lambda: [], device=torch.device("cpu")))
    assert sorted(replay.buffer["index"].tolist()) == list(range(300))
    assert replay.rows_seen == 300


def test_the_reservoir_is_uniform_over_a_chunk() -> None:
    """Inclusion counts of 1000 streamed rows in a 100-row reservoir over 400 seeds: every decile of the stream
    is equally likely (chi-square, 9 degrees of freedom, p > 0.001), the first rows as much as the last."""
    counts = np.zeros(10)
    for seed in range(400):
        replay = Replay(size=100, seed=seed)
        stream_chunk(replay, 0, 0, 1000, batch=64)
        assert len(replay) == 100
        counts += np.bincount(replay.buffer["index"].numpy() // 100, minlength=10)
    expected = 400 * 100 / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, (chi2, counts)  # the 0.999 quantile of chi-square(9)


def test_merging_keeps_every_chunk_its_share() -> None:
    reservoir = Replay(size=100, policy="reservoir")
    stream_chunk(reservoir, 0, 0, 300)
    stream_chunk(reservoir, 1, 1000, 100)
    chunks = reservoir.buffer["chunk"].tolist()
    assert len(chunks) == 100 and chunks.count(1) == 25 and chunks.count(0) == 75  # 100 x 100 / 400 rows seen
    balanced = Replay(size=100, policy="balanced")
    stream_chunk(balanced, 0, 0, 300)
    stream_chunk(balanced, 1, 1000, 100)
    stream_chunk(balanced, 2, 2000, 300)
    assert np.bincount(balanced.buffer["chunk"].numpy()).tolist() == [34, 33, 33]
    assert (balanced.buffer["index"][balanced.buffer["chunk"] == 1] >= 1000).all()


def test_shards_sum_to_the_size_and_a_new_world_size_deals_the_union_out_again() -> None:
    shards = []
    for rank in range(3):
        replay = Replay(size=100)
        replay.setup(rank, 3)
        stream_chunk(replay, 0, rank * 10_000, 500)  # each rank streams its own rows
        shards.append(replay)
    assert [s.capacity for s in shards] == [34, 33, 33] and sum(len(s) for s in shards) == 100
    states = [s.state_dict() for s in shards]
    union = sorted(i for s in shards for i in s.buffer["index"].tolist())
    same = Replay(size=100)
    same.load_state_dict(states, rank=1, world_size=3)
    assert torch.equal(same.buffer["index"], shards[1].buffer["index"])
    regrouped = []
    for rank in range(2):
        replay = Replay(size=100)
        replay.load_state_dict(states, rank=rank, world_size=2)
        regrouped.append(replay)
    assert sorted(i for s in regrouped for i in s.buffer["index"].tolist()) == union  # nothing lost or doubled
    assert [len(s) for s in regrouped] == [50, 50]


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _batches(images: torch.Tensor, offset: int, batch: int = 8):
    def batches(epoch: int, skip: int):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        starts = list(range(0, len(images) - batch + 1, batch))[skip:]
        return (Batch.from_images(images[order[i:i + batch]], index=order[i:i + batch] + offset) for i in starts)
    return batches


@pytest.mark.parametrize("strategy", ["sequential+replay", "sequential+replay+mas"])
def test_a_line_with_replay_resumes_inside_a_chunk_bit_for_bit(tmp_path, strategy: str) -> None:
    """Chunk 1 with replay interrupted after an in-chunk checkpoint and resumed: weights and buffer equal an
    uninterrupted line's."""
    chunks = [_images(32, 1), _images(32, 2)]
    options = {"replay": {"size": 20, "ratio": 0.5}, "mas": {"lambd": 10.0, "batches": 2}}
    make = lambda: LineTrainer(config(strategy=strategy, strategy_options=options, checkpoint_every_steps=3))  # noqa: E731
    reference = make()
    for c in (0, 1):
        reference.train_chunk(c, _batches(chunks[c], 1000 * c), 4, on_checkpoint=lambda: None)
    replay = reference.strategy.strategies[1]
    assert len(replay) == 20 and replay.rows_seen == 64
    assert sorted(set(replay.buffer["chunk"].tolist())) == [0, 1]

    interrupted = make()
    interrupted.train_chunk(0, _batches(chunks[0], 0), 4, on_checkpoint=lambda: None)

    def checkpoint_then_die() -> None:
        save_state(tmp_path, interrupted.state_dict())
        if interrupted.position["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        interrupted.train_chunk(1, _batches(chunks[1], 1000), 4, on_checkpoint=checkpoint_then_die)
    resumed = make()
    resumed.load_state_dict(load_state(tmp_path))
    resumed.train_chunk(1, _batches(chunks[1], 1000), 4)
    for (name, a), b in zip(reference.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), name
    again = resumed.strategy.strategies[1]
    assert torch.equal(again.buffer["index"], replay.buffer["index"])
    assert torch.equal(again.buffer["images"], replay.buffer["images"])


def test_joint_with_replay_is_refused() -> None:
    # JT trains on every past chunk already: replaying them again only reweights the past.
    with pytest.raises(ValueError, match=r"joint\+replay: replay needs the base sequential, not joint"):
        LineTrainer(config(strategy="joint+replay"))


# ------------------------------------------------------------------------------------------------ DDP
def _tiny_buffer_worker(rank: int, world: int) -> dict:
    """A line per buffer size on `world` gloo ranks: what each rank's steps trained on, its shard, its weights."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for size in (1, 3):
        trainer = LineTrainer(config(strategy="sequential+replay", epochs_per_chunk=1,
                                     strategy_options={"replay": {"size": size, "ratio": 0.5}}),
                              wrap_model=DistributedDataParallel, rank=rank)
        replay = trainer.strategy.strategies[1]
        rows_trained: list[tuple[int, int]] = []
        own = replay.prepare_batch

        def recorded(batch, ctx, own=own, rows_trained=rows_trained):
            mixed = own(batch, ctx)
            rows_trained.append((ctx.chunk, len(mixed)))
            return mixed

        replay.prepare_batch = recorded
        for chunk in (0, 1):
            trainer.train_chunk(chunk, _batches(_images(16, 10 * chunk + rank), 1000 * chunk + 100 * rank), 2)
        out[size] = {"rows": rows_trained, "shard": len(replay),
                     "weights": {k: v.detach().clone() for k, v in trainer.method.named_parameters()}}
    return out


def test_a_buffer_with_fewer_rows_than_ranks_neither_hangs_nor_splits_the_batch_shapes() -> None:
    """2 gloo ranks, 8 rows a rank a step. A 1-row buffer leaves rank 1's shard empty: before, rank 0 trained on
    8 + 4 replayed rows and rank 1 on 8, and the loss's all-gather of unequal shapes failed. Now the ranks agree
    that not every shard has rows and neither replays; a 3-row buffer (shards of 2 and 1) replays 4 rows on both."""
    from tests.trainers import ddp_harness

    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        context = ddp_harness.start_ranks(ddp_harness._entry, (_tiny_buffer_worker, world, ddp_harness.free_port(),
                                                               out_dir), nprocs=world, join=False)
        deadline = time.monotonic() + 300  # measured: 10 s idle, 120 s on a loaded 2-core machine; a hang stops here
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("the ranks hung: a step's gathers waited on shapes that did not match")
        ranks = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    one, three = [r[1] for r in ranks], [r[3] for r in ranks]
    assert [r["shard"] for r in one] == [1, 0] and [r["shard"] for r in three] == [2, 1]
    assert one[0]["rows"] == one[1]["rows"] == [(0, 8), (0, 8), (1, 8), (1, 8)]
    assert three[0]["rows"] == three[1]["rows"] == [(0, 8), (0, 8), (1, 12), (1, 12)]
    for line in (one, three):  # and DDP kept the replicas identical
        assert all(torch.equal(v, line[1]["weights"][k]) for k, v in line[0]["weights"].items())
