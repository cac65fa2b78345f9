"""Online training as ONE long Ray Train job per group of lines: the workers read the stream, learn every stream
batch (`trainers.online.OnlineTrainer`), checkpoint every K batches and end a segment every X batches.

    result = train_online(plan, tasks, run_name, on_event)     # events: start, online_batch, segment, online_end

The stream: the plan's tasks (`stream.chunks`, cut by `online.order`) read one after another, each through the
same seeded, order-preserving Ray Data pipeline a chunk is read with, and cut into stream batches of
`online.batch_size` rows across task boundaries (a short tail at the end of the stream is not delivered). Every
rank reads the whole stream and keeps rows `rank::world` of each batch, so all ranks agree on what batch k is
without talking; resuming at batch k skips the first k batches before decoding them.

A polled source (`online.source`, `orchestrator.data.online_source`) replaces the tasks: the shards of a folder in the
order they arrive, read by every rank (rank 0 lists, verifies and broadcasts each poll's news), cut into stream
batches the same way and decoded on the worker; the checkpoint holds the order consumed so far, and a restart reads
on from the first row not learned (`PolledStream.rows(skip_rows)`). The stream ends when the source does; the
batches since the last segment are then the last, partial segment, and the rows after the last full batch (fewer
than a batch) go into the replay memory untrained, counted (`tail_rows` on the final segment and `online_end`)
and said in a warning. Every segment
event says whether it is the stream's last (`final`), which makes its evaluation the line's.

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
from orchestrator.data.ingest import DeviceBatchDecoder, chunk_dataset, row_index, shard_refs
from orchestrator.data.online_source import PolledStream, single_process
from orchestrator.plan.planner import ExperimentPlan
from orchestrator.train.checkpoints import CheckpointFs, checkpoint_dir_name
from orchestrator.train.online_checkpoint import MemoryCheckpointer, restore_online
from orchestrator.train.runner import GroupResult, LineTask, fit_with_events
from trainers.engine.loop import LineTrainer
from trainers.engine.step import NonFiniteLossError
from trainers.engine.types import Batch
from trainers.online.loop import OnlineTrainer

# How many batch and segment events a checkpoint keeps, to be said again after a restart: what a driver that died may not
# have logged yet (it lags the workers by the events in its queue, far fewer than this).
EVENT_LOG_SIZE = 512


def stream_batches(tasks: Iterator[Iterator[dict[str, np.ndarray]]], size: int,
                   tail: list[dict[str, np.ndarray]] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of exactly `size` rows from the tasks' batches in order, across task boundaries. A tail
    shorter than `size` at the end is not a batch: it is appended to `tail` when given (else dropped)."""
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
    if pending and tail is not None:
        tail.append({k: np.concatenate([b[k] for b in pending]) for k in pending[0]})


def _rank_rows(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    return {k: v[rank::world] for k, v in batch.items()}


def _online_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: every line of the group through the whole stream."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    events, online_cfg = config["events"], config["online"]
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))

    def send(event: dict[str, Any]) -> None:
        if rank == 0:
            events.put(event)

    # A polled source's news goes from rank 0 to every rank over gloo, whatever the training backend.
    broadcast = single_process
    if world > 1 and online_cfg.source is not None:
        group = dist.new_group(backend="gloo")

        def broadcast(obj: Any) -> Any:
            box = [obj]
            dist.broadcast_object_list(box, src=0, group=group)
            return box[0]

    restored_from, restored = restore_online(config, ray.train.get_checkpoint(), rank, world, online_cfg.memory_size)
    restored_line = restored["line_index"] if restored is not None else -1
    send({"type": "start", "restored_from": restored_from, "time": time.time(),
          "nodes": [ray.get_runtime_context().get_node_id()]})
    decoder = DeviceBatchDecoder(config["image_size"], device, "skip", config["corrupt_counter"])
    run_url = f"{config['storage_uri'].rstrip('/')}/{config['run_name']}"
    # Each rank's memory share in its own file of the checkpoint; only the newest checkpoint keeps the shares.
    checkpointer = MemoryCheckpointer(config["checkpoint_fs"], run_url, rank, world, restored_from,
                                      threads=config["threads_per_worker"])
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
        source = None
        if online_cfg.source is not None:  # a live stream: the polled folder's shards, in arrival order
            source = PolledStream(online_cfg.source, config["manifest"], rank, broadcast,
                                  restored.get("source") if line_index == restored_line else None)
        limit = config["total_batches"]  # None: until the source ends
        if (limit is not None and start >= limit) or (line_index == restored_line and restored.get("stream_ended")):
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

        checkpointer.cache.clear()  # (encodings of the previous line's memory)

        def save(dir_name: str, ended: bool = False) -> dict[str, Any]:
            """Every rank: checkpoint `dir_name`; rank 0 gets its sizes (checkpoint_bytes: every file of it,
            memory_file_bytes: the memory shares as stored, buffer_bytes: the shares' rows decoded, state_bytes:
            what stays once the next checkpoint prunes the shares)."""
            with tempfile.TemporaryDirectory() as folder:
                sizes = checkpointer.save(folder, online, {
                    "line_index": line_index, "line_id": task.line.id, "event_log": list(event_log),
                    **({"source": source.state_dict()} if source is not None else {}), "stream_ended": ended})
                checkpoint = ray.train.Checkpoint.from_directory(folder) if sizes.pop("wrote") else None
                ray.train.report({"line": task.line.id, "batch": online.batches_done}, checkpoint=checkpoint,
                                 checkpoint_dir_name=dir_name)
            checkpointer.saved(dir_name)
            return sizes

        reported = (0, 0)

        def report_source() -> None:
            """The source's arrivals and skips, when they changed (rank 0 alone knows the skip reasons' order)."""
            nonlocal reported
            if source is None or (len(source.arrivals), len(source.skipped)) == reported:
                return
            reported = (len(source.arrivals), len(source.skipped))
            event = {"type": "source", "line": task.line.id, "job_key": job.key, "batch": online.batches_done,
                     "arrived": [a.name for a in source.arrivals], "rows": [a.rows for a in source.arrivals],
                     "skipped": [[s.name, s.reason] for s in source.skipped]}
            send(event)
            event_log.append(event)

        def source_counts() -> dict[str, int]:
            return {} if source is None else {"arrived_shards": len(source.arrivals),
                                              "skipped_shards": len(source.skipped)}

        # Stream time: rank 0's clock at this (re)start, with batch `start` arriving now.
        t0 = torch.tensor([time.time()], dtype=torch.float64)
        if world > 1:
            dist.broadcast(t0, src=0)
        budget = online_cfg.time_budget_s

        def arrival(k: int) -> float:
            return float(t0.item()) + (k - start) * budget

        # A resumed segment still spans from its first batch (its wall time counts from the restart).
        segment_started, segment_first = time.time(), start - start % online_cfg.segment_batches
        last_segment: dict[str, Any] | None = next(
            (e for e in reversed(event_log) if e["type"] == "segment"), None)

        def end_segment(final: bool) -> None:
            nonlocal segment_started, segment_first, last_segment
            done = online.batches_done
            event = {"type": "segment", "line": task.line.id, "job_key": job.key,
                     "segment": (done - 1) // online_cfg.segment_batches, "first_batch": segment_first,
                     "batches": done, "started": segment_started, "ended": time.time(), "final": final,
                     **online.counters(), **source_counts(), "world_size": world,
                     **({"tail_rows": tail_rows} if final else {})}
            dir_name = checkpoint_dir_name(task.line, 0) if final else checkpoint_dir_name(task.line, 0, done)
            event["checkpoint_uri"] = f"{run_url}/{dir_name}"
            event_log.append(event)  # (replayed without its stored bytes, which the checkpoint holds)
            stored = save(dir_name, ended=final)
            send({**event, **stored})
            segment_started, segment_first, last_segment = time.time(), done, event

        def rank_batch(raw: dict[str, np.ndarray]) -> Batch:
            """This rank's rows of a stream batch, decoded."""
            rows = _rank_rows(raw, rank, world)
            if config["decode"] == "device" or source is not None:  # (a polled shard's rows come encoded)
                images, picked = decoder.decode(rows)
                rows = {"label": rows["label"][picked], "domain": rows["domain"][picked],
                        "index": row_index(rows["key"][picked])}
            else:  # decoded by Ray Data, which also gave each row its `index`
                images = torch.from_numpy(rows["image"]).permute(0, 3, 1, 2)
            return Batch(images, *(torch.from_numpy(np.asarray(rows[c]).astype("int64"))
                                   for c in ("label", "index", "domain")))

        warned, final_sent, stopped, tail_rows = False, False, False, 0
        tail: list[dict[str, np.ndarray]] = []  # a polled stream's rows after its last full batch
        if source is None:
            batches = itertools.islice(_stream(config), start, limit)
        else:  # a restored stream reads on from its first row not learned; the shards before it are not read again
            batches = itertools.islice(stream_batches(iter([source.rows(start * config["batch_size"])]),
                                                      config["batch_size"], tail),
                                       None if limit is None else max(0, limit - start))
        for k, raw in enumerate(batches, start=start):
            batch = rank_batch(raw)
            if budget is not None and time.time() < arrival(k):
                time.sleep(arrival(k) - time.time())  # the stream has not delivered it yet
            # A batch that spans two tasks belongs to the newer one: the older has ended. (A polled source has none.)
            try:
                report = online.learn(batch, deadline=arrival(k + 1) if budget is not None else None,
                                      task=int(raw["task"][-1]) if "task" in raw else None)
            except NonFiniteLossError as exc:
                # As a chunked line: deterministic, so not retried; the group goes on with its next line.
                send({"type": "diverged", "line": task.line.id, "chunk": 0, "job_key": job.key, "message": str(exc)})
                stopped = True
                break
            batch_event = {"type": "online_batch", "line": task.line.id, "job_key": job.key, **report.as_dict(),
                           **online.counters(), "time": time.time()}
            send(batch_event)
            event_log.append(batch_event)
            report_source()
            if online.budget_warning is not None and not warned:
                warned = True
                send({"type": "online_warning", "line": task.line.id, "job_key": job.key,
                      "message": online.budget_warning})
            done = online.batches_done
            final = limit is not None and done == limit
            if done % online_cfg.segment_batches == 0 or final:
                end_segment(final)
                final_sent = final
            elif online_cfg.checkpoint_every_batches and done % online_cfg.checkpoint_every_batches == 0:
                save(checkpoint_dir_name(task.line, 0, done))
        if stopped:
            continue
        # The stream ended (its source stalled or said so, its rows ran out, or max_batches): the batches since the
        # last segment are the last, partial segment; a stream that ended just after a segment makes that one final.
        report_source()
        if tail and not final_sent:
            # The source ended with fewer rows than a batch after the last full one: not trained on (a short batch
            # would deal unevenly over the ranks), but kept in the replay memory, counted and said.
            tail_rows = len(tail[0]["label"])
            rest = rank_batch(tail[0]) if len(tail[0]["label"][rank::world]) else None
            if online.memory is not None and rest is not None and len(rest):
                online.memory.add(rest)
            send({"type": "online_warning", "line": task.line.id, "job_key": job.key,
                  "message": f"the stream ended with {tail_rows} rows after its last full batch of "
                             f"{config['batch_size']}: " + ("put into the replay memory, not trained on"
                                                            if online.memory is not None else
                                                            "not learned (no replay memory to keep them)")})
        if not final_sent:
            if online.batches_done > segment_first:
                end_segment(True)
            elif last_segment is not None:
                send({**last_segment, "final": True, "tail_rows": tail_rows})
        send({"type": "online_end", "line": task.line.id, "job_key": job.key, **online.counters(),
              **source_counts(), "tail_rows": tail_rows, "ended_by": _ended_by(source, limit, online.batches_done), "time": time.time()})


def _ended_by(source: Any, limit: int | None, done: int) -> str:
    if limit is not None and done >= limit:
        return "max_batches" if source is not None else "stream"
    return source.end if source is not None and source.end else "stream"


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


def total_batches(plan: ExperimentPlan) -> int | None:
    """Stream batches the online plan delivers: the order once (full batches), or online.max_batches; None for a
    polled source without max_batches (it ends when the source does)."""
    online = plan.spec.online
    if online.source is not None:
        return online.max_batches
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
            "manifest": plan.manifest, "run_name": run_name, "checkpoint_fs": CheckpointFs(spec.storage.storage_options),
            "threads_per_worker": max(1, int(res.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             # Ray keeps every reported checkpoint: each segment's is its run's and LoggedModel's
                             # (the lineage), and a resumed controller checks every folder of its snapshot. What
                             # is bounded is pruned by the workers (online_checkpoint): the memory lives in the
                             # newest checkpoint only.
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    return fit_with_events(trainer, events, run_name, on_event, ", ".join(t.line.id for t in tasks))
