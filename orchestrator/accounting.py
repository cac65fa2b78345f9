"""What a chunk cost: its wall time, the device-hours it held, and the bytes it left on storage.

    metrics = chunk_resources(chunk_event, spec.resources)   # logged on the chunk run

`device_hours` counts what a user pays for: GPU-hours when workers hold GPUs, CPU-core-hours otherwise (wall time
x workers x devices per worker). `stored_bytes` is the chunk's checkpoint as uploaded; `buffer_bytes` is the part of
it that the continual strategies keep over all ranks (replay and LUMP buffers, MAS's importances and anchor
weights): inside the checkpoint, not added to it.
"""

from __future__ import annotations

from typing import Any


def device_kind(resources: Any) -> str:
    return "gpu" if resources.gpus_per_worker > 0 else "cpu"


def chunk_resources(event: dict[str, Any], resources: Any) -> dict[str, float]:
    """Metrics of one chunk event (from the worker: started/ended wall clock, world size, checkpoint sizes).

    Sizes are absent from an event that was re-sent from a checkpoint after a restart (the sizes are measured
    after the checkpoint is written); then only the times are returned, and a report shows the sizes as missing.
    """
    wall = max(0.0, float(event["ended"]) - float(event["started"]))
    world = int(event.get("world_size", 1))
    per_worker = resources.gpus_per_worker if resources.gpus_per_worker > 0 else resources.cpus_per_worker
    metrics = {"wall_seconds": wall, "device_hours": wall * world * per_worker / 3600.0}
    if "checkpoint_bytes" in event:
        metrics["checkpoint_bytes"] = float(event["checkpoint_bytes"])
        metrics["buffer_bytes"] = float(event.get("buffer_bytes", 0))
        metrics["stored_bytes"] = float(event["checkpoint_bytes"])
    return metrics
