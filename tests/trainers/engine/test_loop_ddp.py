"""Two gloo ranks whose epochs are cut short unequally (rows dropped as corrupt on one of them): both stop at the
same step, with no hang in DDP's all-reduce, and the next epoch starts at its own first batch on both."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.trainers.ddp_harness import start_ranks
from tests.trainers.engine.test_loop import batches_of, config, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        from trainers.engine.loop import LineTrainer

        trainer = LineTrainer(config(), wrap_model=DistributedDataParallel, rank=rank)
        images = data(n=24 if rank == 0 else 16, seed=rank)  # 3 and 2 batches of 8; 4 planned per epoch
        seen: list[tuple[int, int]] = []

        def batches(epoch: int, skip: int):
            for i, batch in enumerate(batches_of(images)(epoch, skip)):
                seen.append((epoch, skip + i))
                yield batch

        report = trainer.train_chunk(0, batches, steps_per_epoch=4)
        torch.save({"steps": report.steps, "seen": seen, "position": trainer.position,
                    "weights": dict(trainer.backbone.named_parameters())}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_short_epoch(tmp_path: Path) -> None:
    start_ranks(_worker, (2, _free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["steps"] for r in ranks] == [4, 4]  # 2 steps per epoch x 2 epochs: the shorter rank decides
    # Rank 0 fetched its third batch of each epoch, learned rank 1 had none, and stopped without training on it.
    assert ranks[0]["seen"] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert ranks[1]["seen"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["position"]["chunks_done"] == 1 for r in ranks)
    for name, weight in ranks[0]["weights"].items():  # DDP kept the replicas' parameters identical
        assert torch.equal(weight, ranks[1]["weights"][name]), name


def _resume_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        from trainers.engine.checkpoint import load_state, save_state
        from trainers.engine.loop import LineTrainer

        images = data(n=24, seed=rank)  # each rank its own rows, 3 batches per epoch, 2 epochs
        folder = Path(out_dir) / "checkpoint"
        straight = LineTrainer(config(checkpoint_every_steps=4), wrap_model=DistributedDataParallel, rank=rank)

        def save() -> None:  # as runner._train_fn: every rank gathers, rank 0 writes
            state = {**straight.state_dict(), "generators": straight.generator_states()}
            if rank == 0:
                save_state(folder, state)
            dist.barrier()

        straight.train_chunk(0, batches_of(images), 3, on_checkpoint=save)
        resumed = LineTrainer(config(), wrap_model=DistributedDataParallel, rank=rank)
        resumed.load_state_dict(load_state(folder))
        report = resumed.train_chunk(0, batches_of(images), 3)
        same = all(torch.equal(a, b) for a, b in zip(straight.method.parameters(), resumed.method.parameters()))
        torch.save({"same": same, "steps": report.steps, "generators": len(load_state(folder)["generators"])},
                   Path(out_dir) / f"resume{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_resume_restores_every_ranks_generator(tmp_path: Path) -> None:
    """Train 4 of 6 steps on 2 ranks, checkpoint, resume both: the weights equal 6 straight steps bit for bit, which
    needs each rank's own augmentation generator back (rank 1 given rank 0's would crop differently)."""
    start_ranks(_resume_worker, (2, _free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"resume{r}.pt") for r in range(2)]
    assert [r["generators"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [2, 2]
    assert [r["same"] for r in ranks] == [True, True]
