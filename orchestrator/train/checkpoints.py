"""Checkpoint folders of a training run: their names, their order, and the newest complete one to resume from.

    checkpoint_dir_name(line, chunk)          # 'simclr-sequential.chunk-001' (chunk end)
    checkpoint_dir_name(line, chunk, step)    # 'simclr-sequential.chunk-001.step-0000012' (inside the chunk)
    checkpoint_order(name, line_ids)          # sort key: line, chunk, in-chunk step, chunk end last
    restore_newest(config, latest, load_state)  # on the workers, after a restart
"""

from __future__ import annotations

import re
from typing import Any, Callable

from orchestrator import storage
from orchestrator.plan.planner import Line

# Beside state.pt in every chunk-end checkpoint: the chunk's event, so that a driver resuming after a crash can log
# (and evaluate) a chunk whose checkpoint was persisted but whose MLflow run never was, without loading the state.
CHUNK_EVENT_FILE = "chunk_event.json"


def checkpoint_dir_name(line: Line | str, chunk: int, step: int | None = None) -> str:
    line_id = line.id if isinstance(line, Line) else line
    base = f"{line_id}.chunk-{chunk:03d}"
    return base if step is None else f"{base}.step-{step:07d}"


_CHECKPOINT_NAME = re.compile(r"(?P<line>.+)\.chunk-(?P<chunk>\d{3})(?:\.step-(?P<step>\d{7}))?")


def checkpoint_order(name: str, line_ids: list[str]) -> tuple[int, int, int, int] | None:
    """Sort key of a checkpoint folder name within a group's run: line, chunk, in-chunk step, chunk end last."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    if match is None or match["line"] not in line_ids:
        return None
    step = match["step"]
    return (line_ids.index(match["line"]), int(match["chunk"]), 0 if step else 1, int(step or 0))


def restore_newest(config: dict[str, Any], latest: Any, load_state: Callable) -> tuple[str | None, Any]:
    """The newest complete checkpoint of this run: Ray's latest, or a newer one in the run's folder.

    Ray Train 2.60 registers a reported checkpoint only when its controller next polls the workers, so after a
    kill `get_checkpoint()` can be one behind what was already persisted. Rank 0 lists the run's folder, picks the
    newest folder whose state verifies (a partial upload does not), and every rank loads that one.
    """
    import ray.train
    import torch.distributed as dist

    line_ids = [task.line.id for task in config["tasks"]]
    run_url = f"{config['storage_uri'].rstrip('/')}/{config['run_name']}"
    fs, run_path = config["checkpoint_fs"](run_url)
    chosen: list[Any] = [None]
    if ray.train.get_context().get_world_rank() == 0:
        candidates = []
        if latest is not None:
            candidates.append(latest.path.rstrip("/"))
        try:
            import pyarrow.fs as pafs

            infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
            candidates += [info.path for info in infos if info.type == pafs.FileType.Directory]
        except OSError:
            pass  # storage listing failed: fall back to Ray's own latest
        ranked = sorted({c for c in candidates if checkpoint_order(c.rsplit("/", 1)[-1], line_ids)},
                        key=lambda c: checkpoint_order(c.rsplit("/", 1)[-1], line_ids), reverse=True)
        for path in ranked:
            try:
                with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
                    load_state(folder)  # verifies the footer; the state itself is loaded by every rank below
            except Exception:
                continue  # partial upload or unreadable: an older one will do
            chosen[0] = path
            break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None, None
    with ray.train.Checkpoint(chosen[0], filesystem=fs).as_directory() as folder:
        return chosen[0], load_state(folder)


class CheckpointFs:
    """Picklable: checkpoint URL -> (pyarrow filesystem, path), with the spec's storage options."""

    def __init__(self, storage_options: dict[str, Any]):
        self.storage_options = storage_options

    def __call__(self, url: str):
        return storage.pyarrow_filesystem(url, self.storage_options)
