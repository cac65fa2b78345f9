"""Micro-benchmark: saving and loading a full training state, locally and through the Ray Train checkpoint path.

`checkpoint_costs` times ``trainers.engine.checkpoint.save_state`` / ``load_state`` of a state (model, optimizer with
momentum buffers, strategy, position) on local disk, and persisting it to / restoring it from ``memory://`` the way
Ray Train and the evaluator do (pyarrow ``copy_files`` up, ``ray.train.Checkpoint.as_directory`` down). Used by
``bench.overheads``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import median


def checkpoint_state(cfg) -> dict[str, Any]:
    """A LineTrainer's full state as the runner saves it, with SGD momentum buffers as after a first step."""
    from bench.step_throughput import loop_config
    from trainers.engine.loop import LineTrainer

    trainer = LineTrainer(loop_config(cfg), device="cpu")
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            trainer.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return {**trainer.state_dict(), "line_index": 0, "line_id": f"{cfg.method}-sequential",
            "chunk_event": {"type": "chunk", "chunk": 0}}


def checkpoint_costs(models: list[tuple[str, Any]], reps: int, scratch: Path) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs
    import ray.train

    from orchestrator.storage import pyarrow_filesystem
    from trainers.engine.checkpoint import load_state, save_state

    out = []
    for label, cfg in models:
        state = checkpoint_state(cfg)
        params = sum(p.numel() for p in state["method"].values() if torch.is_tensor(p))
        times: dict[str, list[float]] = {"local_save": [], "local_load": [], "memory_save": [], "memory_load": []}
        size = 0
        for rep in range(reps):
            folder = scratch / f"ckpt-{label}-{rep}"
            t = time.perf_counter()
            path = save_state(folder, state)
            times["local_save"].append(time.perf_counter() - t)
            size = path.stat().st_size
            t = time.perf_counter()
            load_state(folder)
            times["local_load"].append(time.perf_counter() - t)
            # memory://: what a persisted checkpoint costs: save locally, copy up (as ray.train.report persists it)
            fs, mem_path = pyarrow_filesystem(f"memory://bench-ckpt/{label}-{rep}")
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                t = time.perf_counter()
                save_state(tmp, state)
                pafs.copy_files(tmp, mem_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
                times["memory_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with ray.train.Checkpoint(mem_path, filesystem=fs).as_directory() as restored:
                load_state(restored)
            times["memory_load"].append(time.perf_counter() - t)
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            fs.delete_dir(mem_path)
        out.append({"model": label, "model_tensors_M": params / 1e6, "file_mb": size / 2**20, "reps": reps, "seconds": times,
                    **{f"median_{k}_s": median(v) for k, v in times.items()}})
        del state
    return out
