"""Evaluations inside a chunk (`eval.every_epochs: k`): does downstream accuracy saturate, or decline, with longer
pre-training?

Every k epochs the workers write a mid-chunk checkpoint and send an `epoch_checkpoint` event; the driver evaluates it
in the evaluation actor like a chunk end and records it here as an `epoch_eval` run (tags: the job, its line and
chunk, `streamssl.epoch`, the checkpoint). The chunk's own evaluation is the last point of the same curve, so the
plan run carries, per line and protocol, `{line}.{name}_top1_by_epoch` with step = epochs trained on the line so
far (chunk x epochs_per_chunk + epoch): MLflow draws it as accuracy against pre-training length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from orchestrator.plan.planner import ExperimentPlan, Job
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker

RUN_TYPE = "epoch_eval"
EPOCH = tr.TAG + "epoch"


@dataclass(frozen=True)
class EpochCheckpoint:
    """A mid-chunk checkpoint waiting for its evaluation."""

    job: Job
    epoch: int  # epochs of the chunk trained when it was written
    step: int
    checkpoint_uri: str

    @property
    def name(self) -> str:
        return f"{self.job.name}/epoch-{self.epoch}"


def line_epoch(plan: ExperimentPlan, job: Job, epoch: int) -> int:
    """Epochs the line has trained when `job` has trained `epoch` of its own."""
    return job.chunk * plan.spec.optim.epochs_per_chunk + epoch


def log_by_epoch(tracker: Tracker, parent: str, plan: ExperimentPlan, job: Job, epoch: int,
                 result: dict[str, Any]) -> None:
    """One point of each protocol's accuracy-against-training-length curve on the plan run."""
    step = line_epoch(plan, job, epoch)
    metrics = {f"{job.line.id}.{name}_top1_by_epoch": result[f"{name}_top1"]
               for name in plan.spec.eval.every_chunk if f"{name}_top1" in result}
    if metrics:
        tracker.log_metrics(parent, metrics, step=step)


def log_epoch_eval(tracker: Tracker, parent: str, plan: ExperimentPlan, point: EpochCheckpoint,
                   result: dict[str, Any]) -> str:
    """The `epoch_eval` run of one mid-chunk checkpoint; returns its id."""
    job = point.job
    tags = {
        tr.RUN_TYPE: RUN_TYPE,
        tr.PARENT: parent,
        tr.PLAN_KEY: plan.key,
        tr.JOB_KEY: job.key,
        tr.LINE: job.line.id,
        tr.CHUNK: str(job.chunk),
        EPOCH: str(point.epoch),
        tr.CHECKPOINT: point.checkpoint_uri,
    }
    run_id = tracker.create_run(point.name, tags)
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({"epoch": point.epoch, "step_in_chunk": point.step})
    tracker.log_metrics(run_id, metrics)
    tracker.log_json(run_id, "eval_result.json", json.loads(json.dumps(result, default=str)))
    tracker.end_run(run_id, "FINISHED")
    log_by_epoch(tracker, parent, plan, job, point.epoch, result)
    return run_id
