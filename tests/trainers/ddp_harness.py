"""Run a function on 2 gloo ranks (real torch.distributed, one process each) and collect what each returns.

    def worker(rank, world):                  # module level, so the spawned processes can import it
        ...; return {"loss": loss.detach(), "grad": x.grad}
    ranks = run_ddp(worker)                   # [rank 0's dict, rank 1's dict]

Used by the DDP-equivalence tests: a loss over the gathered batch on 2 ranks must equal the loss on one process
holding the whole batch, with the same gradients.
"""

from __future__ import annotations

import multiprocessing
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The ranks are forked from one forkserver per test session that has torch (and the trainers) imported already: a
# `spawn`ed rank re-imports torch, 5-10 s a process on the loaded 2-core machine, which was most of every DDP test.
# A forkserver is single-threaded and never ran Ray, so its forks are clean (a plain fork of the pytest process, which
# may hold Ray's and gloo's threads, is not). Each rank still is its own process with its own gloo group.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "trainers.engine.loop",
                                        "tests.trainers.ddp_harness"])


def start_ranks(fn: Callable, args: tuple, nprocs: int = 2, join: bool = True):
    """`torch.multiprocessing.spawn(fn, args, nprocs, join)`, the ranks forked from the session's forkserver."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Callable[[int, int], dict[str, Any]], world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.save(worker(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp(worker: Callable[[int, int], dict[str, Any]], world: int = 2) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out_dir:
        start_ranks(_entry, (worker, world, free_port(), out_dir), nprocs=world)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s equal share of the rows of `x`."""
    b = x.shape[0] // world
    return x[rank * b:(rank + 1) * b]
