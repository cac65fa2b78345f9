"""What a chunk cost: its wall time, the device-hours it held, and what the line must keep after it.

    stored = strategy_bytes(ranks["strategy"])                         # worker: the strategies' state over all ranks
    metrics = chunk_resources(chunk_event, spec.resources, data_kept(plan, job))   # driver: logged on the chunk run

`device_hours` counts what a user pays for: GPU-hours when workers hold GPUs, CPU-core-hours otherwise (wall time
x workers x devices per worker).

Storage is two things, logged apart (the seed study's resource table is about the first):

- `data_kept_rows` / `data_kept_bytes`: the training rows the line must retain to go on after this chunk. Joint
  training keeps every chunk so far (chunks 0..t: the stream plan's rows, at the data set's encoded bytes per
  training row, from the manifest's shards), so it grows per chunk; sequential training keeps none (0); replay and
  LUMP keep their buffers' rows over all ranks (`buffer_rows`), at the bytes the buffers hold them in
  (`buffer_bytes`: decoded uint8 images and their labels, as the checkpoint stores them).
- `model_state_bytes`: everything else the checkpoint holds (weights, optimizer, generators, and the strategies'
  model state: MAS's importances Omega and anchor weights theta*, logged alone as `strategy_state_bytes`), i.e.
  `checkpoint_bytes` (the checkpoint as uploaded) minus the buffers' rows inside it.

`stored_bytes = data_kept_bytes + model_state_bytes`: what the line keeps in all (the checkpoint, plus the past
chunks joint training rereads from the data set). A buffer is inside the checkpoint, never added on top of it.
"""

from __future__ import annotations

from typing import Any, Sequence

from trainers.engine.checkpoint import tensor_bytes


def device_kind(resources: Any) -> str:
    return "gpu" if resources.gpus_per_worker > 0 else "cpu"


def _is_row_buffer(state: Any) -> bool:
    """A row buffer's state (replay, LUMP: `trainers.strategies.buffer.RowBuffer.state_dict`)."""
    return isinstance(state, dict) and all(isinstance(state.get(part), dict) and "index" in state[part]
                                           for part in ("buffer", "staged"))


def strategy_bytes(rank_states: Sequence[Any]) -> dict[str, int]:
    """Over every rank's strategy state ({strategy name: state} per rank, as a checkpoint's "strategy"): the rows
    the row buffers hold (`buffer_rows`), their tensors' bytes (`buffer_bytes`), and the bytes of the other
    strategy state (`strategy_state_bytes`: MAS's Omega and theta*, CaSSLe's counters)."""
    rows = buffer = other = 0
    for states in rank_states:
        for state in (states or {}).values():
            if _is_row_buffer(state):
                rows += sum(len(state[part]["index"]) for part in ("buffer", "staged"))
                buffer += tensor_bytes([state["buffer"], state["staged"]])
                other += tensor_bytes({k: v for k, v in state.items() if k not in ("buffer", "staged")})
            else:
                other += tensor_bytes(state)
    return {"buffer_rows": rows, "buffer_bytes": buffer, "strategy_state_bytes": other}


def bytes_per_row(manifest: Any, split: str) -> float:
    """The data set's encoded bytes per row of `split`: its shards' bytes over their rows (the manifest's)."""
    shards = manifest.shard_entries(split)
    rows = sum(s.rows for s in shards)
    return sum(s.bytes for s in shards) / rows if rows else 0.0


def data_kept(plan: Any, job: Any) -> tuple[int, float]:
    """(rows, bytes) of the data set a line keeps after `job`'s chunk besides its buffers: joint training keeps the
    chunks it trains on (0..t), every other base strategy none."""
    if job.line.strategy.split("+")[0] != "joint":
        return 0, 0.0
    rows = sum(plan.stream.chunks[c].rows for c in job.training_chunks)
    return rows, rows * bytes_per_row(plan.manifest, plan.spec.data.train_split)


def chunk_resources(event: dict[str, Any], resources: Any, kept: tuple[int, float] = (0, 0.0)) -> dict[str, float]:
    """Metrics of one chunk event (from the worker: started/ended wall clock, world size, checkpoint sizes), with
    `kept` = `data_kept(plan, job)` (the data set rows the line keeps besides its buffers).

    Sizes are absent from an event that was re-sent from a checkpoint after a restart (the sizes are measured
    after the checkpoint is written); then only the times are returned, and a report shows the sizes as missing.
    """
    wall = max(0.0, float(event["ended"]) - float(event["started"]))
    world = int(event.get("world_size", 1))
    per_worker = resources.gpus_per_worker if resources.gpus_per_worker > 0 else resources.cpus_per_worker
    metrics = {"wall_seconds": wall, "device_hours": wall * world * per_worker / 3600.0}
    if "checkpoint_bytes" in event:
        checkpoint, buffer = float(event["checkpoint_bytes"]), float(event.get("buffer_bytes", 0))
        data = {"rows": float(kept[0] + event.get("buffer_rows", 0)), "bytes": float(kept[1]) + buffer}
        metrics.update({"checkpoint_bytes": checkpoint, "buffer_bytes": buffer,
                        "buffer_rows": float(event.get("buffer_rows", 0)),
                        "strategy_state_bytes": float(event.get("strategy_state_bytes", 0)),
                        "data_kept_rows": data["rows"], "data_kept_bytes": data["bytes"],
                        "model_state_bytes": checkpoint - buffer, "stored_bytes": data["bytes"] + checkpoint - buffer})
    return metrics
