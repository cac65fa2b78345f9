"""Checkpoints as MLflow 3 LoggedModels, and evaluations that score them, so MLflow's own Models view walks
chunk (or online segment) -> checkpoint -> metrics without `streamssl lineage`."""

from __future__ import annotations

from typing import Any

from orchestrator.evaluate.evaluation import headline
from orchestrator.plan.planner import ExperimentPlan, Job
from orchestrator.spec.experiment import Spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker


def log_checkpoint_model(tracker: Tracker, plan: ExperimentPlan, run_id: str, name: str, step: int, job: Job,
                         checkpoint_uri: str, tags: dict[str, str], params: dict[str, str]) -> None:
    """The checkpoint `run_id` made at `step` as a LoggedModel of that run; the run is tagged with its id."""
    model_id = tracker.log_checkpoint_model(
        run_id, name, step,
        {tr.CHECKPOINT: checkpoint_uri, tr.LINE: job.line.id, tr.PLAN_KEY: plan.key, tr.JOB_KEY: job.key, **tags},
        {"line.method": job.line.method, "line.strategy": job.line.strategy, **params})
    tracker.set_tags(run_id, {tr.MODEL_ID: model_id})


def log_scored_metrics(tracker: Tracker, spec: Spec, plan: ExperimentPlan, run_id: str, model_run: str,
                       metrics: dict[str, float], result: dict[str, Any]) -> None:
    """An evaluation's metrics on `run_id`; its headline numbers (logged once) also score `model_run`'s
    LoggedModel on the evaluation split, a dataset input of `run_id`. A run logged before streamssl made
    LoggedModels has none, and its evaluation gets plain metrics."""
    model_id = tracker.get_run(model_run).data.tags.get(tr.MODEL_ID)
    scores = headline(result, spec.eval.every_chunk) if model_id is not None else {}
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in scores})
    if scores:
        eval_set = f"{spec.name}-{spec.data.eval_split}"
        tracker.log_dataset(run_id, plan.data_url, eval_set, plan.data_digest, "eval")
        tracker.log_model_metrics(run_id, model_id, scores, 0, eval_set, plan.data_digest)
