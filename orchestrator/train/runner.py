"""Ray Train jobs: one TorchTrainer (one DDP worker group) trains a group of lines chunk after chunk.

A worker group costs ~20-30 s to start on a 2-core machine, so the lines of a plan share groups
(`resources.lines_per_worker_group`, 0 = all in one). Inside the group every chunk boundary is a checkpoint and a
`ray.train.report`; rank 0 also sends small events (steps, chunk ends) to the driver through a Ray queue so the
driver can show progress and log each chunk's MLflow run as soon as its checkpoint is persisted.

Restarts: after a worker dies, Ray Train restarts the group (FailureConfig) and `ray.train.get_checkpoint()`
returns the latest checkpoint, which records the line and the position inside it; the train function resumes there.
Re-running a plan with the same Ray Train run name (`--resume`) restores the same way.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from orchestrator import storage
from orchestrator.data.ingest import (
    DeviceBatchDecoder,
    chunk_dataset,
    chunk_rows,
    planned_chunk_rows,
    release_split,
    row_index,
    shard_refs,
)
from orchestrator.errors import TrainingError
from orchestrator.plan.data_factors import group_label_map
from orchestrator.plan.planner import ExperimentPlan, Job, Line
from orchestrator.spec.experiment import Spec
from orchestrator.train.accounting import strategy_bytes

# Re-exported: the driver, recovery and tests name checkpoints through the runner.
from orchestrator.train.checkpoints import CHUNK_EVENT_FILE, CheckpointFs, checkpoint_dir_name, restore_newest
from trainers.engine.checkpoint import folder_bytes, load_state, save_state
from trainers.engine.loop import LineTrainer, LoopConfig
from trainers.engine.step import NonFiniteLossError
from trainers.engine.types import Batch
from trainers.views.plan import ViewPlan, view_plan


def planned_line_steps(plan: ExperimentPlan, line: Line) -> tuple[int, int]:
    """(optimizer steps the plan gives `line` over all its chunks, steps of one epoch of its first chunk)."""
    spec = plan.spec
    per_epoch = [planned_chunk_rows(plan.stream, job.training_chunks) // spec.optim.batch_size
                 for job in plan.jobs_of(line)]
    return spec.optim.epochs_per_chunk * sum(per_epoch), (per_epoch[0] if per_epoch else 0)


def loop_config(spec: Spec, line: Line, use_gpu: bool, plan: ExperimentPlan | None = None) -> LoopConfig:
    """The worker's config of `line`; with the `plan`, also the line's length (which `cosine_line` needs)."""
    line_steps, line_warmup_steps = 0, 0
    if plan is not None:
        line_steps, first_epoch = planned_line_steps(plan, line)
        line_warmup_steps = int(spec.optim.warmup_epochs * first_epoch)
    views = spec_view_plan(spec, line.method)
    precision = spec.resources.precision
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    return LoopConfig(
        method=line.method,
        strategy=line.strategy,
        image_size=spec.data.image_size,
        views=views,
        backbone=spec.backbone.name,
        backbone_options=spec.backbone.model_dump(exclude={"name"}),
        method_options=dict(spec.methods.get(line.method, {})),
        strategy_options=spec.strategy_options(line.strategy),
        optimizer=spec.optim.name,
        lr=spec.optim.lr,
        momentum=spec.optim.momentum,
        weight_decay=spec.optim.weight_decay,
        eeta=spec.optim.eeta,
        lr_scaling=spec.optim.lr_scaling,
        epochs_per_chunk=spec.optim.epochs_per_chunk,
        batch_size=spec.optim.batch_size // spec.resources.workers,
        global_batch=spec.optim.batch_size,
        warmup_epochs=spec.optim.warmup_epochs,
        schedule=spec.optim.schedule,
        line_steps=line_steps,
        line_warmup_steps=line_warmup_steps,
        seed=spec.seed,
        precision=precision,
        channels_last=use_gpu,
        checkpoint_every_steps=spec.resources.checkpoint_every_steps,
        sync_bn=spec.optim.sync_bn,
    )


def spec_view_plan(spec: Spec, method: str | None = None) -> ViewPlan:
    """The spec's `views` section as the workers' ViewPlan (of `method`'s lines: `views.local.methods` may leave
    their local views out)."""
    g, local = spec.views.global_, spec.views.local
    return view_plan(
        global_count=g.count, global_size=spec.view_size, global_scale=tuple(g.scale),
        local_count=local.count if method is None else spec.local_views_for(method), local_size=spec.local_view_size,
        local_scale=tuple(local.scale), preset=spec.views.preset, global_options=g.augment_options(),
        local_options=local.augment_options(), min_iou=local.min_iou, max_iou=local.max_iou,
        local_loss_weight=local.loss_weight,
    )


@dataclass
class LineTask:
    """What one line of a worker group must do: its jobs (chunks) still to train."""

    line: Line
    config: LoopConfig
    jobs: list[Job]
    resume_uri: str | None = None  # checkpoint of the last finished chunk, when resuming without Ray's own state


@dataclass
class GroupResult:
    restarts: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    start_s: float = 0.0  # fit() called -> the first worker reported in (worker group and datasets up)
    stop_s: float = 0.0  # the last chunk's event -> fit() returned (group teardown)


def _dataset_name(strategy: str, chunk: int) -> str:
    return f"{strategy}-{chunk}"


def _train_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    events = config["events"]
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))

    def send(event: dict[str, Any]) -> None:
        if rank == 0:
            events.put(event)

    def wrap(model):
        return ray.train.torch.prepare_model(model, move_to_device=False)

    restored_line, restored_state = -1, None
    restored_from, restored_state = restore_newest(config, ray.train.get_checkpoint(), load_state)
    if restored_state is not None:
        restored_line = restored_state["line_index"]
    send({"type": "start", "restored_from": restored_from, "time": time.time(),
          "nodes": _gather(ray.get_runtime_context().get_node_id())})
    if restored_state is not None and restored_state.get("chunk_event"):
        # The group may have died between persisting a chunk's checkpoint and telling the driver: tell it again
        # (the driver ignores a chunk it has already logged).
        send(restored_state["chunk_event"])

    # The last line of the group that reads each dataset (lines with one strategy share their chunks' datasets):
    # once it has finished the chunk, the dataset's split coordinator is released (ingest.release_split).
    last_reader = {_dataset_name(t.line.strategy, j.chunk): i for i, t in enumerate(config["tasks"]) for j in t.jobs}
    label_map = config["label_map"]
    device_decoder = DeviceBatchDecoder(config["image_size"], device, config["on_corrupt"], config["corrupt_counter"])
    for line_index, task in enumerate(config["tasks"]):
        if line_index < restored_line or (line_index > restored_line and not task.jobs):
            continue
        trainer = LineTrainer(task.config, device=device, wrap_model=wrap, rank=rank)
        if line_index == restored_line:
            trainer.load_state_dict(restored_state)
        elif task.resume_uri:
            fs, path = config["checkpoint_fs"](task.resume_uri)
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
                trainer.load_state_dict(load_state(folder))
        chunk_jobs = {job.chunk: job for job in task.jobs}

        def report(dir_name: str, metrics: dict[str, Any], chunk_event: dict[str, Any] | None = None) -> dict:
            """Save (rank 0) and persist a checkpoint; returns how long the save and the report took, and what the
            checkpoint stores (its bytes; the strategies' state over all ranks, a replay buffer's rows, in it)."""
            with tempfile.TemporaryDirectory() as folder:
                checkpoint, stored = None, {}
                started = time.perf_counter()
                ranks = trainer.rank_states()  # every rank's generator and strategy shard, so each resumes its own
                if rank == 0:
                    save_state(folder, {**trainer.state_dict(), **ranks, "line_index": line_index,
                                        "line_id": task.line.id, "chunk_event": chunk_event})
                    if chunk_event is not None:
                        with open(os.path.join(folder, CHUNK_EVENT_FILE), "w") as f:
                            json.dump(chunk_event, f)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                    stored = {"checkpoint_bytes": folder_bytes(folder), **strategy_bytes(ranks["strategy"])}
                saved = time.perf_counter()
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)
                return {"checkpoint_save_s": saved - started, "checkpoint_report_s": time.perf_counter() - saved,
                        **stored}

        while trainer.position["chunks_done"] < config["num_chunks"]:
            chunk = trainer.position["chunks_done"]
            job = chunk_jobs.get(chunk)
            if job is None:  # finished before a resume but the checkpoint predates it: nothing to redo
                raise RuntimeError(f"{task.line.id}: chunk {chunk} is neither done nor scheduled")
            reported: list[str] = []  # in-chunk checkpoint folders written so far
            shard = ray.train.get_dataset_shard(_dataset_name(task.line.strategy, chunk))
            steps_per_epoch = config["steps_per_epoch"][_dataset_name(task.line.strategy, chunk)]

            def batches(epoch: int, skip: int):
                # The same order on every pass of an epoch (seeded block order, preserve_order, seeded local
                # shuffle), so the batches consumed before an in-chunk checkpoint are dropped here, before decoding.
                def passes():
                    for n in itertools.count():  # one pass, or (data.class_fraction) as many as the epoch takes
                        delivered = 0
                        for batch in shard.iter_batches(
                                batch_size=task.config.batch_size, batch_format="numpy", drop_last=True,
                                local_shuffle_buffer_size=task.config.batch_size * 4,
                                local_shuffle_seed=epoch + 1000 * chunk + 1_000_003 * n):
                            delivered += 1
                            yield n > 0, batch
                        if not repeat or delivered == 0:
                            return

                repeat = config["cycle"][_dataset_name(task.line.strategy, chunk)]
                for repeated, batch in itertools.islice(passes(), skip, None):
                    if label_map is not None:  # data.labels: group
                        batch["label"] = np.where(batch["label"] >= 0, label_map[np.maximum(batch["label"], 0)], -1)
                    if config["decode"] == "device":
                        images, source = device_decoder.decode(batch)
                        batch = {"label": batch["label"][source], "domain": batch["domain"][source],
                                 "index": row_index(batch["key"][source])}
                    else:
                        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
                    yield Batch(images, *(torch.from_numpy(batch[c].astype("int64")) for c in ("label", "index",
                                                                                                 "domain")),
                                repeated=repeated)

            def on_step(info) -> None:
                send({"type": "step", "line": task.line.id, "chunk": info.chunk, "step": info.step,
                      "steps_total": info.steps_total, "loss": info.loss, "lr": info.lr,
                      "samples_per_s": info.samples_per_s * ctx.get_world_size()})

            def on_checkpoint() -> None:
                reported.append(checkpoint_dir_name(task.line, chunk, trainer.position["step"]))
                report(reported[-1], {"line": task.line.id, "chunk": chunk, "step": trainer.position["step"],
                                      "chunk_end": False})

            def on_epoch_end(epochs_done: int) -> None:
                # eval.every_epochs: a mid-chunk checkpoint the driver evaluates (saturation with longer training)
                if not config["eval_every_epochs"] or epochs_done % config["eval_every_epochs"]:
                    return
                dir_name = checkpoint_dir_name(task.line, chunk, trainer.position["step"])
                if dir_name not in reported:  # the step interval may have just saved this very state
                    on_checkpoint()
                send({"type": "epoch_checkpoint", "line": task.line.id, "chunk": chunk, "job_key": job.key,
                      "epoch": epochs_done, "step": trainer.position["step"],
                      "checkpoint_uri": f"{config['storage_uri'].rstrip('/')}/{config['run_name']}/{dir_name}"})

            started = time.time()
            try:
                result = trainer.train_chunk(chunk, batches, steps_per_epoch, on_step=on_step,
                                             on_checkpoint=on_checkpoint, on_epoch_end=on_epoch_end)
            except NonFiniteLossError as exc:
                # Deterministic: a retry from the same checkpoint would diverge again, so this line stops here
                # without Ray Train's retries (every rank raises: the finiteness check is all-reduced), and the
                # group goes on with its other lines (the driver marks this one failed).
                send({"type": "diverged", "line": task.line.id, "chunk": chunk, "job_key": job.key,
                      "message": str(exc)})
                break
            dir_name = checkpoint_dir_name(task.line, chunk)
            event = {"type": "chunk", "line": task.line.id, "chunk": chunk, "job_key": job.key,
                     "checkpoint_uri": f"{config['storage_uri'].rstrip('/')}/{config['run_name']}/{dir_name}",
                     "started": started, "ended": time.time(), "report": result.as_dict(),
                     "world_size": ctx.get_world_size()}
            timing = report(dir_name, {"line": task.line.id, "chunk": chunk, "loss": result.final_loss,
                                       "chunk_end": True}, chunk_event=event)
            send({**event, **timing})
            # ray.train.report is a barrier: every rank is done reading this chunk's shard.
            if rank == 0 and last_reader.get(_dataset_name(task.line.strategy, chunk)) == line_index:
                release_split(shard)


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def ray_run_name(plan: ExperimentPlan, parent_run_id: str, group_index: int) -> str:
    return f"{plan.spec.name}-{plan.key}-{parent_run_id[:8]}-g{group_index}"


def line_groups(plan: ExperimentPlan) -> list[list[Line]]:
    """A fixed partition of the plan's lines (independent of progress, so resumed runs keep their names)."""
    size = plan.spec.resources.lines_per_worker_group or len(plan.lines)
    return [plan.lines[i : i + size] for i in range(0, len(plan.lines), size)]


def train_group(
    plan: ExperimentPlan,
    tasks: list[LineTask],
    run_name: str,
    on_event: Callable[[dict[str, Any]], None],
    corrupt_counter: Any = None,
) -> GroupResult:
    """Train `tasks` in one TorchTrainer; `on_event` gets every rank-0 event on the calling thread."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    spec = plan.spec
    res = spec.resources
    use_gpu = res.gpus_per_worker > 0
    refs = shard_refs(plan.manifest, plan.data_url, spec.data.train_split)
    datasets, steps_per_epoch, cycle = {}, {}, {}
    for task in tasks:
        for job in task.jobs:
            name = _dataset_name(task.line.strategy, job.chunk)
            if name in datasets:
                continue
            # The planned epoch length; rows dropped as undecodable end an epoch earlier (the loop stops when the
            # batches run out on any rank). With data.class_fraction the steps stay the full chunk's and the
            # reader cycles the kept rows.
            rows, kept = planned_chunk_rows(plan.stream, job.training_chunks), chunk_rows(plan.stream, job.training_chunks)
            steps = rows // spec.optim.batch_size
            if steps < 1 or kept // spec.optim.batch_size < 1:  # (a cycled pass needs one full batch)
                hint = "raise data.class_fraction, " if kept < rows else ""
                raise TrainingError(
                    f"{job.name}: {kept} training rows but optim.batch_size is {spec.optim.batch_size}; "
                    f"{hint}lower the batch size or use fewer chunks"
                )
            cycle[name] = kept < rows
            datasets[name] = chunk_dataset(refs, plan.stream, job.training_chunks, spec.data.image_size,
                                           spec.data.storage_options, counter=corrupt_counter,
                                           decode=spec.data.decode, seed=spec.seed * 1009 + job.chunk)
            steps_per_epoch[name] = steps

    storage_fs, storage_path = storage.pyarrow_filesystem(spec.checkpoint_url, spec.storage.storage_options)
    events: Queue = Queue(actor_options={"num_cpus": 0})
    resources = {"CPU": res.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={
            "tasks": tasks,
            "events": events,
            "num_chunks": plan.stream.num_chunks,
            "steps_per_epoch": steps_per_epoch,
            "storage_uri": spec.checkpoint_url,
            "run_name": run_name,
            "checkpoint_fs": CheckpointFs(spec.storage.storage_options),
            "eval_every_epochs": spec.eval.every_epochs if spec.eval.every_chunk else 0,
            "cycle": cycle,  # datasets whose kept rows repeat within an epoch (data.class_fraction)
            "label_map": group_label_map(plan.manifest) if spec.data.labels == "group" else None,
            "threads_per_worker": max(1, int(res.cpus_per_worker)),
            "decode": spec.data.decode,
            "image_size": spec.data.image_size,
            "on_corrupt": "skip",
            "corrupt_counter": corrupt_counter,
        },
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    return fit_with_events(trainer, events, run_name, on_event, ", ".join(t.line.id for t in tasks))


def fit_with_events(trainer: Any, events: Any, run_name: str, on_event: Callable[[dict[str, Any]], None],
                    what: str) -> GroupResult:
    """`trainer.fit()` on a thread while this one hands every event from the `events` queue to `on_event`; a
    failure is a TrainingError naming `what` was trained."""
    from ray.util.queue import Empty

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced on the calling thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=f"fit-{run_name}", daemon=True)
    fit_called = time.time()
    thread.start()
    result = GroupResult()
    starts = 0
    first_start = last_chunk = None

    def drain(block: bool) -> None:
        nonlocal starts, first_start, last_chunk
        while True:
            try:
                event = events.get(block=block, timeout=0.5) if block else events.get_nowait()
            except Empty:
                return
            if event["type"] == "start":
                starts += 1
                first_start = first_start or event["time"]
            elif event["type"] in ("chunk", "online_end"):
                last_chunk = time.time()
            if event["type"] != "online_batch":  # (one per stream batch: an unbounded stream must not pile up)
                result.events.append(event)
            on_event(event)
            block = False

    while thread.is_alive():
        drain(block=True)
    thread.join()
    returned = time.time()
    drain(block=False)
    result.restarts = max(0, starts - 1)
    result.start_s = (first_start - fit_called) if first_start else 0.0
    result.stop_s = (returned - last_chunk) if last_chunk else 0.0
    try:
        events.shutdown()
    except Exception:
        pass
    if "error" in outcome:
        raise TrainingError(f"training of {what} failed: {outcome['error']}") from (
            outcome["error"]
        )
    return result
