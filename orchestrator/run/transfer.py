"""`streamssl eval RUN_ID --task T --data URL`: one transfer evaluation of a chunk (or online segment) run's checkpoint,
run as a Ray task and logged as an evaluation run nested under the run it evaluates.

    spec = transfer_spec("fewshot", "streamssl-runs/data/synth-downstream", ["way=5", "shot=5"])
    done = evaluate_transfer(Tracker(uri), chunk_run_id, spec, prepare_root=Path("streamssl-runs/downstream"))
    done.run_id, done.scores        # the evaluation run, {"synth-downstream.fewshot_5way5shot_mean": ...}

The evaluation run: `mlflow.parentRunId` and `streamssl.evaluates` = the evaluated run, run type "eval", the task,
the set and the initialisation as tags (`streamssl.eval_task`, `streamssl.eval_set`, `streamssl.eval_init`), the
line and chunk (or segment) copied from the evaluated run; no plan key, so a `--resume` of the plan never takes it
for the chunk's own evaluation. Its params are `transfer_params(spec)`; the downstream set is its dataset input
(context "transfer"); the task's scores, named `<set>.<score>`, score the checkpoint's LoggedModel on that set (plain
run metrics for a run logged before LoggedModels, and for an `init=random` baseline, whose scores are not the
checkpoint's; its run name ends `.random`); its records and images are JSON and PNG artifacts. The run is created
only once the task has finished, so a failure (a bad URL, a missing checkpoint, a task that raised) leaves nothing
behind.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.data.downstream import detection_downstream, downstream_shards
from orchestrator.errors import TrackingError, TrainingError
from orchestrator.spec.transfer import DETECTION_TASKS, TransferSpec, transfer_params
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker

EVALUATED_KINDS = ("chunk", "segment")
TRANSFER_KEY = tr.TRANSFER_KEY  # on an evaluation run: the hash of its params, so a resume skips it
COPIED_TAGS = (tr.LINE, tr.CHUNK, tr.SEGMENT, tr.JOB_KEY, tr.CHECKPOINT)


@dataclass(frozen=True)
class TransferRecord:
    run_id: str  # the evaluation run
    evaluated: str  # the chunk or segment run
    scores: dict[str, float]  # `<set>.<score>`, as logged
    metrics: dict[str, float]
    artifacts: list[str]
    device: str


def checkpoint_of(tracker: Tracker, run_id: str, role: str = "RUN_ID") -> tuple[Any, str]:
    """(the run, its checkpoint URI) of a chunk or segment run; a TrackingError naming the run otherwise."""
    run = tracker.get_run(run_id)  # an unknown id: "run ... not found in <uri>"
    kind = run.data.tags.get(tr.RUN_TYPE)
    if kind not in EVALUATED_KINDS:
        what = f"a {kind} run" if kind else "not a streamssl run"
        raise TrackingError(f"{role} {run_id} is {what}: transfer evaluates a chunk or segment run's checkpoint "
                            f"(`streamssl lineage {run_id}` lists them)")
    uri = run.data.tags.get(tr.CHECKPOINT)
    if not uri:
        raise TrackingError(f"{role} {run_id} ({kind} run, {run.info.status}) has no checkpoint "
                            f"(no {tr.CHECKPOINT} tag): its chunk never persisted one")
    return run, uri


def _start_ray(address: str | None) -> tuple[Any, bool]:
    """Ray, and whether this call started it (an embedded local Ray is shut down again afterwards)."""
    import ray

    from orchestrator.train.ray_init import init_ray

    started = not ray.is_initialized()
    init_ray(address, None)
    return ray, started


def evaluate_transfer(tracker: Tracker, run_id: str, spec: TransferSpec, *, prepare_root: Path,
                      address: str | None = None) -> TransferRecord:
    """Run `spec`'s task on `run_id`'s checkpoint as a Ray task (a GPU when the cluster has one) and log it."""
    from orchestrator.evaluate.transfer import run_transfer

    evaluated, checkpoint = checkpoint_of(tracker, run_id)
    anchor = checkpoint_of(tracker, spec.norm_rescale_anchor, "norm_rescale_anchor")[1] \
        if spec.norm_rescale_anchor else None
    name = spec.data.set_name
    splits = [spec.data.train_split, spec.data.eval_split]
    if spec.task in DETECTION_TASKS:
        data_url, options = spec.data.url, spec.data.storage_options
        manifest = detection_downstream(data_url, options, "--data", splits)
    else:
        data_url, manifest = downstream_shards(spec.data.url, spec.data.storage_options, str(prepare_root / name),
                                               "--data", splits)
        options = spec.data.storage_options if data_url == spec.data.url else {}
    ray, started = _start_ray(address)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(run_transfer).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        try:
            result = ray.get(task.remote(spec, checkpoint, data_url, manifest, options, anchor))
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            raise TrainingError(f"transfer task {spec.task} on {name} of run {run_id} failed: "
                                f"{type(cause).__name__}: {cause}") from None
    finally:
        if started:
            ray.shutdown()
    return _log(tracker, evaluated, spec, data_url, manifest, result)


def _log(tracker: Tracker, evaluated: Any, spec: TransferSpec, data_url: str, manifest, result: dict[str, Any]
         ) -> TransferRecord:
    run_id = evaluated.info.run_id
    name = spec.data.set_name
    tracker.experiment_id = evaluated.info.experiment_id
    tags = {tr.RUN_TYPE: "eval", tr.PARENT: run_id, tr.EVALUATES: run_id, tr.EVAL_TASK: spec.task,
            tr.EVAL_SET: name, tr.EVAL_INIT: spec.init, tr.TAG + "device": result["device"],
            TRANSFER_KEY: transfer_key(spec),
            **{k: evaluated.data.tags[k] for k in COPIED_TAGS if k in evaluated.data.tags}}
    suffix = "" if spec.init == "checkpoint" else f".{spec.init}"
    eval_run = tracker.create_run(f"{evaluated.info.run_name}/{name}.{spec.task}{suffix}", tags)
    try:
        tracker.log_params(eval_run, {**transfer_params(spec), "image_size": str(result["image_size"])})
        scores = {f"{name}.{k}": float(v) for k, v in result["scores"].items()}
        metrics = {k: float(v) for k, v in result["metrics"].items()}
        tracker.log_metrics(eval_run, metrics)
        tracker.log_dataset(eval_run, data_url, name, manifest.digest, "transfer")
        # A random-init baseline's scores are not the checkpoint's: they stay plain metrics of the evaluation run.
        model_id = evaluated.data.tags.get(tr.MODEL_ID) if spec.init == "checkpoint" else None
        if model_id is not None:
            tracker.log_model_metrics(eval_run, model_id, scores, 0, name, manifest.digest)
        else:
            tracker.log_metrics(eval_run, scores)
        artifacts = _log_artifacts(tracker, eval_run, result)
        tracker.end_run(eval_run, "FINISHED")
    except BaseException:
        tracker.end_run(eval_run, "FAILED", retry_seconds=5.0)
        raise
    return TransferRecord(eval_run, run_id, scores, metrics, artifacts, result["device"])


def transfer_key(spec: TransferSpec) -> str:
    """What makes two transfer evaluations of one checkpoint the same: the hash of their params."""
    return hashlib.sha256(json.dumps(transfer_params(spec), sort_keys=True).encode()).hexdigest()[:16]


def after_chunk_transfers(tracker: Tracker, spec, plan, chunk_runs: dict[str, str], console=None) -> list[str]:
    """Every `eval.transfer` entry of `spec` on the chunk runs (job key -> run id) of its chosen chunks, lines in
    plan order; an evaluation already FINISHED with the same options (an earlier attempt's) is skipped. Returns
    the evaluation runs it logged."""
    logged = []
    for entry in spec.eval.transfer:
        chunks = set(entry.chunks(plan.stream.num_chunks))
        key = transfer_key(entry)
        for job in plan.jobs:
            run_id = chunk_runs.get(job.key)
            if job.chunk not in chunks or run_id is None:
                continue
            done = tracker.runs(f"tags.`{tr.EVALUATES}` = '{run_id}' and tags.`{TRANSFER_KEY}` = '{key}' "
                                "and attributes.status = 'FINISHED'")
            if done:
                continue
            record = evaluate_transfer(tracker, run_id, entry, prepare_root=spec.workdir / "downstream")
            logged.append(record.run_id)
            if console is not None:
                scores = ", ".join(f"{k}={v:.3f}" for k, v in record.scores.items())
                console.print(f"{job.name}: {entry.task} on {entry.data.set_name}: {scores}", highlight=False)
    return logged


def _log_artifacts(tracker: Tracker, run_id: str, result: dict[str, Any]) -> list[str]:
    from PIL import Image

    names = []
    for file, record in result["records"].items():
        tracker.log_json(run_id, file, record)
        names.append(file)
    with tempfile.TemporaryDirectory() as folder:
        for file, image in result["images"].items():
            path = Path(folder) / file
            Image.fromarray(image).save(path)
            tracker.log_file(run_id, path)
            names.append(file)
    return names


__all__ = ["EVALUATED_KINDS", "TRANSFER_KEY", "TransferRecord", "after_chunk_transfers", "checkpoint_of",
           "evaluate_transfer", "transfer_key"]
