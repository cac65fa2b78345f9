"""Online training as ONE long Ray Train job per group of lines: the workers read the stream, learn every stream
batch (`trainers.online.OnlineTrainer`), checkpoint every K batches and end a segment every X batches.

    result = train_online(plan, tasks, run_name, on_event)     # events: start, online_batch, segment, online_end

The stream: the plan's tasks (`stream.chunks`, cut by `online.order`) read one after another, each through the
same seeded, order-preserving Ray Data pipeline a chunk is read with, and cut into stream batches of
`online.batch_size` rows across task boundaries (a short tail at the end of the stream is not delivered). Every
rank reads the whole stream and keeps rows `rank::world` of each batch, so all ranks agree on what batch k is
without talking; resuming at batch k skips the first k batches before decoding them.

Arrival: with `online.time_budget_s` the stream batches arrive at a fixed interval from the stream's start
(batch k at t0 + k x budget; t0 is rank 0's clock, shared), training never starts a batch before it arrives, and
batch k's deadline is batch k+1's arrival. Without it the stream delivers as fast as training takes it.
"""

from __future__ import annotations

import collections
import itertools
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from orchestrator import storage
from orchestrator.checkpoints import CheckpointFs, checkpoint_dir_name, restore_newest
from orchestrator.ingest import DeviceBatchDecoder, chunk_dataset, row_index, shard_refs
from orchestrator.planner import ExperimentPlan
from orchestrator.runner import GroupResult, LineTask, fit_with_events

# How many batch and segment events a checkpoint keeps, to be said again after a restart: what a driver that died may not
# have logged yet (it lags the workers by the events in its queue, far fewer than this).
EVENT_LOG_SIZE = 512


def stream_batches(tasks: Iterator[Iterator[dict[str, np.ndarray]]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of exactly `size` rows from the tasks' batches in order, across task boundaries; a tail
    shorter than `size` at the end is dropped."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for task in tasks:
        for batch in task:
            rows = len(next(iter(batch.values())))
            pending.append(batch)
            held += rows
            while held >= size:
                joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
                yield {k: v[:size] for k, v in joined.items()}
                rest = {k: v[size:] for k, v in joined.items()}
                held -= size
                pending = [rest] if held else []


def _rank_rows(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    return {k: v[rank::world] for k, v in batch.items()}


def _online_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: every line of the group through the whole stream."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from trainers.checkpoint import folder_bytes, load_state, save_state, tensor_bytes
    from trainers.engine.step import NonFiniteLossError
    from trainers.engine.types import Batch
    from trainers.loop import LineTrainer
    from trainers.online.loop import OnlineTrainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    events, online_cfg = config["events"], config["online"]
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))

    def send(event: dict[str, Any]) -> None:
        if rank == 0:
            events.put(event)

    restored_from, restored = restore_newest(config, ray.train.get_checkpoint(), load_state)
    restored_line = restored["line_index"] if restored is not None else -1
    send({"type": "start", "restored_from": restored_from, "time": time.time(),
          "nodes": [ray.get_runtime_context().get_node_id()]})
    decoder = DeviceBatchDecoder(config["image_size"], device, "skip", config["corrupt_counter"])
    run_url = f"{config['storage_uri'].rstrip('/')}/{config['run_name']}"
    for line_index, task in enumerate(config["tasks"]):
        if line_index < restored_line or (line_index > restored_line and not task.jobs):
            continue
        job = task.jobs[0]
        trainer = LineTrainer(task.config, device=device, rank=rank,
                              wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
        online = OnlineTrainer(trainer, online_cfg)
        if line_index == restored_line:
            online.load_state_dict(restored)
        start = online.batches_done
        # The events of the batches before the restored checkpoint, said again: the driver that heard them may
        # have died before logging them (it logs each stream batch and segment once).
        event_log: collections.deque = collections.deque(
            restored.get("event_log", []) if line_index == restored_line else [], maxlen=EVENT_LOG_SIZE)
        if start >= config["total_batches"]:
            # Finished before the restart, which may have come before the driver heard of it.
            for event in event_log:
                send(event)
            send({"type": "online_end", "line": task.line.id, "job_key": job.key, **online.counters(),
                  "time": time.time()})
            continue
        send({"type": "online_start", "line": task.line.id, "job_key": job.key, "batch": start,
              "time": time.time(), "world_size": world})
        for event in event_log:
            send(event)

        def save(dir_name: str) -> dict[str, Any]:
            with tempfile.TemporaryDirectory() as folder:
                ranks = online.rank_states()
                checkpoint, stored = None, {}
                if rank == 0:
                    save_state(folder, {**online.state_dict(), **ranks, "line_index": line_index,
                                        "line_id": task.line.id, "event_log": list(event_log)})
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                    stored = {"checkpoint_bytes": folder_bytes(folder),
                              "buffer_bytes": tensor_bytes(ranks["online"]["memory"])}
                ray.train.report({"line": task.line.id, "batch": online.batches_done}, checkpoint=checkpoint,
                                 checkpoint_dir_name=dir_name)
                return stored

        # Stream time: rank 0's clock at this (re)start, with batch `start` arriving now.
        t0 = torch.tensor([time.time()], dtype=torch.float64)
        if world > 1:
            dist.broadcast(t0, src=0)
        budget = online_cfg.time_budget_s

        def arrival(k: int) -> float:
            return float(t0.item()) + (k - start) * budget

        # A resumed segment still spans from its first batch (its wall time counts from the restart).
        segment_started, segment_first = time.time(), start - start % online_cfg.segment_batches
        warned = False
        for k, raw in enumerate(itertools.islice(_stream(config), start, config["total_batches"]), start=start):
            rows = _rank_rows(raw, rank, world)
            if config["decode"] == "device":
                images, source = decoder.decode(rows)
                rows = {"label": rows["label"][source], "domain": rows["domain"][source],
                        "index": row_index(rows["key"][source])}
            else:  # decoded by Ray Data, which also gave each row its `index`
                images = torch.from_numpy(rows["image"]).permute(0, 3, 1, 2)
            batch = Batch(images, *(torch.from_numpy(np.asarray(rows[c]).astype("int64"))
                                    for c in ("label", "index", "domain")))
            if budget is not None and time.time() < arrival(k):
                time.sleep(arrival(k) - time.time())  # the stream has not delivered it yet
            # A batch that spans two tasks belongs to the newer one: the older has ended.
            try:
                report = online.learn(batch, deadline=arrival(k + 1) if budget is not None else None,
                                      task=int(raw["task"][-1]))
            except NonFiniteLossError as exc:
                # As a chunked line: deterministic, so not retried; the group goes on with its next line.
                send({"type": "diverged", "line": task.line.id, "chunk": 0, "job_key": job.key, "message": str(exc)})
                break
            batch_event = {"type": "online_batch", "line": task.line.id, "job_key": job.key, **report.as_dict(),
                           **online.counters(), "time": time.time()}
            send(batch_event)
            event_log.append(batch_event)
            if online.budget_warning is not None and not warned:
                warned = True
                send({"type": "online_warning", "line": task.line.id, "job_key": job.key,
                      "message": online.budget_warning})
            done = online.batches_done
            last = done == config["total_batches"]
            if done % online_cfg.segment_batches == 0 or last:
                event = {"type": "segment", "line": task.line.id, "job_key": job.key,
                         "segment": (done - 1) // online_cfg.segment_batches, "first_batch": segment_first,
                         "batches": done, "started": segment_started, "ended": time.time(),
                         **online.counters(), "world_size": world}
                dir_name = checkpoint_dir_name(task.line, 0) if last else checkpoint_dir_name(task.line, 0, done)
                event["checkpoint_uri"] = f"{run_url}/{dir_name}"
                event_log.append(event)  # (replayed without its stored bytes, which the checkpoint holds)
                stored = save(dir_name)
                send({**event, **stored})
                segment_started, segment_first = time.time(), done
            elif online_cfg.checkpoint_every_batches and done % online_cfg.checkpoint_every_batches == 0:
                save(checkpoint_dir_name(task.line, 0, done))
        else:
            send({"type": "online_end", "line": task.line.id, "job_key": job.key, **online.counters(),
                  "time": time.time()})


def _stream(config: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """The whole stream's numpy batches (every row of each batch, all ranks alike), cycling when asked."""
    def tasks():
        for n in itertools.count():
            for t in range(config["num_tasks"]):
                ds = chunk_dataset(config["refs"], config["stream"], [t], config["image_size"],
                                   config["storage_options"], counter=config["corrupt_counter"],
                                   decode=config["decode"], seed=config["seed"] * 1009 + t + 7919 * n)
                yield ({**b, "task": np.full(len(b["label"]), t)}  # which task each row came from
                       for b in ds.iter_batches(batch_size=config["batch_size"], batch_format="numpy"))
            if not config["cycle"]:
                return

    return stream_batches(tasks(), config["batch_size"])


def total_batches(plan: ExperimentPlan) -> int:
    """Stream batches the online plan delivers: the order once (full batches), or online.max_batches."""
    online = plan.spec.online
    once = sum(c.rows for c in plan.stream.chunks) // online.batch_size
    if online.cycle:
        return online.max_batches
    return min(once, online.max_batches) if online.max_batches else once


def train_online(plan: ExperimentPlan, tasks: list[LineTask], run_name: str,
                 on_event: Callable[[dict[str, Any]], None], corrupt_counter: Any = None) -> GroupResult:
    """Train `tasks` (one job each: the whole stream) in one TorchTrainer; `on_event` gets rank 0's events."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    spec = plan.spec
    res = spec.resources
    use_gpu = res.gpus_per_worker > 0
    storage_fs, storage_path = storage.pyarrow_filesystem(spec.checkpoint_url, spec.storage.storage_options)
    events: Queue = Queue(actor_options={"num_cpus": 0})
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _online_fn,
        train_loop_config={
            "tasks": tasks, "events": events, "online": spec.online, "total_batches": total_batches(plan),
            "num_tasks": plan.stream.num_chunks, "cycle": spec.online.cycle, "batch_size": spec.online.batch_size,
            "refs": shard_refs(plan.manifest, plan.data_url, spec.data.train_split), "stream": plan.stream,
            "image_size": spec.data.image_size, "storage_options": spec.data.storage_options, "seed": spec.seed,
            "decode": spec.data.decode, "corrupt_counter": corrupt_counter, "storage_uri": spec.checkpoint_url,
            "run_name": run_name, "checkpoint_fs": CheckpointFs(spec.storage.storage_options),
            "threads_per_worker": max(1, int(res.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    return fit_with_events(trainer, events, run_name, on_event, ", ".join(t.line.id for t in tasks))
