"""Run a function on 2 gloo ranks (real torch.distributed, one process each) and collect what each returns.

    def worker(rank, world):                  # module level, so the spawned processes can import it
        ...; return {"loss": loss.detach(), "grad": x.grad}
    ranks = run_ddp(worker)                   # [rank 0's dict, rank 1's dict]

Used by the DDP-equivalence tests: a loss over the gathered batch on 2 ranks must equal the loss on one process
holding the whole batch, with the same gradients.
"""

from __future__ import annotations

import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
        mp.spawn(_entry, args=(worker, world, free_port(), out_dir), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s equal share of the rows of `x`."""
    b = x.shape[0] // world
    return x[rank * b:(rank + 1) * b]
