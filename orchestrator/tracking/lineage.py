"""The lineage schema (the tags that link runs, the run kinds) and its readers: `streamssl lineage` and `status`.

    rows = job_states(tracker, plan)           # one row per job: FINISHED / RUNNING / FAILED / PENDING
    chain = lineage_dict(tracker, run_id)      # plan -> chunk run -> checkpoint -> eval runs, from any link

A plan run (`RUN_TYPE` = "plan") is the parent (`PARENT`) of one chunk run per (line, chunk) ("chunk"), each
tagged with its `JOB_KEY`, `LINE`, `CHUNK` and `CHECKPOINT` URI; an evaluation run ("eval") names the chunk run it
`EVALUATES`. Every run carries the `PLAN_KEY`; `CLIENT_TOKEN` makes run creation safe to retry.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.planner import ExperimentPlan
    from orchestrator.tracking.tracker import Tracker

TAG = "streamssl."
RUN_TYPE = TAG + "run_type"
PLAN_KEY = TAG + "plan_key"
JOB_KEY = TAG + "job_key"
LINE = TAG + "line"
CHUNK = TAG + "chunk"
CHECKPOINT = TAG + "checkpoint_uri"
MODEL_ID = TAG + "model_id"  # a chunk run's checkpoint as an MLflow LoggedModel
EVALUATES = TAG + "evaluates"
CLIENT_TOKEN = TAG + "client_token"
PARENT = "mlflow.parentRunId"
# On plan runs: what the plan holds, so `streamssl report` knows which runs should exist without the spec.
STREAM_KIND = TAG + "stream_kind"
LINES = TAG + "lines"  # JSON list of {"id", "method", "strategy"}
NUM_CHUNKS = TAG + "num_chunks"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("streamssl", "torch", "torchvision", "pillow", "ray", "mlflow", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def lineage_dict(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """The chain of any streamssl run, as data: {'plan': id, 'chunk': id|None, 'checkpoint_uri': ..., 'model_id': ...,
    'evals': [...]}."""
    run = tracker.get_run(run_id)
    kind = run.data.tags.get(RUN_TYPE)
    if kind in ("sweep", "trial"):  # sweep -> trials -> plans -> chunks -> evaluations
        from orchestrator.sweep.lineage import sweep_lineage

        return sweep_lineage(tracker, run_id)
    out: dict[str, Any] = {"run_type": kind}
    chunk = run if kind == "chunk" else None
    if kind == "eval":
        chunk = tracker.get_run(run.data.tags[EVALUATES])
    if chunk is not None:
        out["chunk"] = chunk.info.run_id
        out["checkpoint_uri"] = chunk.data.tags.get(CHECKPOINT)
        out["model_id"] = chunk.data.tags.get(MODEL_ID)
        out["plan"] = chunk.data.tags.get(PARENT)
        out["evals"] = [e.info.run_id for e in tracker.evaluation_of(chunk.info.run_id)]
    else:
        out["plan"] = run_id
        out["chunks"] = [r.info.run_id for r in tracker.children(run_id, "chunk")]
    from orchestrator.sweep.lineage import sweep_of

    plan = run if out["plan"] == run_id else tracker.get_run(out["plan"])
    out.update(sweep_of(tracker, plan))  # a sweep trial's plan: where it sits in the sweep
    return out


def job_states(tracker: Tracker, plan: ExperimentPlan) -> list[dict[str, Any]]:
    """Every job of the plan with the state of its newest chunk run (PENDING when it has none)."""
    runs = tracker.runs(f"tags.`{RUN_TYPE}` = 'chunk' and tags.`{PLAN_KEY}` = '{plan.key}'")
    newest: dict[str, Any] = {}
    for run in runs:
        key = run.data.tags.get(JOB_KEY)
        if key not in newest or (run.info.start_time or 0) > (newest[key].info.start_time or 0):
            if key in newest and newest[key].info.status == "FINISHED":
                continue
            newest[key] = run
    rows = []
    for job in plan.jobs:
        run = newest.get(job.key)
        rows.append({
            "job": job.name,
            "key": job.key,
            "state": run.info.status if run else "PENDING",
            "run": run.info.run_id if run else None,
            "knn_top1": run.data.metrics.get("knn_top1") if run else None,
            "linear_top1": run.data.metrics.get("linear_top1") if run else None,
        })
    return rows
