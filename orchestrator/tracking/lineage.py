"""The lineage schema (the tags that link runs, the run kinds) and its readers: `streamssl lineage` and `status`.

    rows = job_states(tracker, plan)           # one row per job: FINISHED / RUNNING / FAILED / PENDING
    rows = segment_states(tracker, plan)       # online plans: one row per segment run
    chain = lineage_dict(tracker, run_id)      # plan -> chunk run -> checkpoint -> eval runs, from any link

A plan run (`RUN_TYPE` = "plan") is the parent (`PARENT`) of one chunk run per (line, chunk) ("chunk"), each
tagged with its `JOB_KEY`, `LINE`, `CHUNK` and `CHECKPOINT` URI; an evaluation run ("eval") names the chunk run it
`EVALUATES`. Every run carries the `PLAN_KEY`; `CLIENT_TOKEN` makes run creation safe to retry.

An online plan's line is one chunk run over the whole stream (its online run); its segment runs ("segment", child
of the plan run, `SEGMENT` index, `ONLINE_RUN`) each hold a checkpoint (a LoggedModel) and that checkpoint's
evaluation metrics; the one the stream ended with is tagged `FINAL_SEGMENT`, and its evaluation is the line's.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.plan.planner import ExperimentPlan
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
# The plan's key without the spec's seed: plans that differ only in `seed` are one study (the report averages them).
STUDY_KEY = TAG + "study_key"
SEGMENT = TAG + "segment"
ONLINE_RUN = TAG + "online_run"
FINAL_SEGMENT = TAG + "final_segment"
# What a segment row shows of its run's metrics (accuracies, deadline misses, a polled source's skipped shards).
SEGMENT_METRICS = ("knn_top1", "linear_top1", "late_batches", "dropped_steps", "skipped_shards")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("streamssl", "torch", "torchvision", "pillow", "ray", "mlflow", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def study_key(plan: ExperimentPlan) -> str:
    """The plan key's recipe (identity, data, stream) with the identity taken without the top-level `seed`."""
    import hashlib

    from orchestrator.spec.params import identity_digest

    parts = (identity_digest(plan.spec, with_seed=False), plan.data_digest, plan.stream.digest)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def plan_tags(plan: ExperimentPlan) -> dict[str, str]:
    """The tags of a plan run: what it is, its key, the data and stream it trained on, its lines, the versions."""
    tags = {
        RUN_TYPE: "plan",
        PLAN_KEY: plan.key,
        TAG + "data_url": plan.data_url,
        TAG + "data_digest": plan.data_digest,
        TAG + "stream_digest": plan.stream.digest,
        STREAM_KIND: plan.stream.kind,
        TAG + "spec_name": plan.spec.name,
        LINES: json.dumps([{"id": line.id, "method": line.method, "strategy": line.strategy} for line in plan.lines]),
        NUM_CHUNKS: str(plan.stream.num_chunks),
        STUDY_KEY: study_key(plan),
    }
    tags.update({TAG + f"version.{k}": v for k, v in versions().items()})
    return tags


def lineage_dict(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """The chain of any streamssl run, as data: {'plan': id, 'chunk': id|None, 'checkpoint_uri': ..., 'model_id': ...,
    'evals': [...]}."""
    run = tracker.get_run(run_id)
    kind = run.data.tags.get(RUN_TYPE)
    if kind in ("sweep", "trial"):  # sweep -> trials -> plans -> chunks -> evaluations
        from orchestrator.sweep.lineage import sweep_lineage

        return sweep_lineage(tracker, run_id)
    out: dict[str, Any] = {"run_type": kind}
    if kind == "segment":
        return {**out, **segment_row(run), "plan": run.data.tags.get(PARENT)}
    chunk = run if kind == "chunk" else None
    if kind == "eval":
        chunk = tracker.get_run(run.data.tags[EVALUATES])
    if chunk is not None:
        out["chunk"] = chunk.info.run_id
        out["checkpoint_uri"] = chunk.data.tags.get(CHECKPOINT)
        out["model_id"] = chunk.data.tags.get(MODEL_ID)
        out["plan"] = chunk.data.tags.get(PARENT)
        out["evals"] = [e.info.run_id for e in tracker.evaluation_of(chunk.info.run_id)]
        if out["plan"]:
            segments = [s for s in _segment_runs(tracker, out["plan"])
                        if s.data.tags.get(ONLINE_RUN) == chunk.info.run_id]
            if segments:
                out["segments"] = [segment_row(s) for s in segments]
    else:
        out["plan"] = run_id
        out["chunks"] = [r.info.run_id for r in tracker.children(run_id, "chunk")]
        segments = _segment_runs(tracker, run_id)
        if segments:
            out["segments"] = [segment_row(s) for s in segments]
    from orchestrator.sweep.lineage import sweep_of

    plan = run if out["plan"] == run_id else tracker.get_run(out["plan"])
    out.update(sweep_of(tracker, plan))  # a sweep trial's plan: where it sits in the sweep
    return out


def _segment_runs(tracker: Tracker, plan_run: str) -> list:
    runs = tracker.children(plan_run, "segment")
    return sorted(runs, key=lambda r: (r.data.tags.get(LINE, ""), int(r.data.tags.get(SEGMENT, -1))))


def segment_row(run: Any) -> dict[str, Any]:
    """A segment run as data: its stream batches, checkpoint (and LoggedModel), evaluation numbers and state."""
    tags, metrics = run.data.tags, run.data.metrics
    return {"segment_run": run.info.run_id, "line": tags.get(LINE), "segment": int(tags.get(SEGMENT, -1)),
            "batches": tags.get(TAG + "stream_batches"), "state": run.info.status,
            "final": tags.get(FINAL_SEGMENT) == "true", "online_run": tags.get(ONLINE_RUN),
            "checkpoint_uri": tags.get(CHECKPOINT), "model_id": tags.get(MODEL_ID),
            **{k: metrics.get(k) for k in SEGMENT_METRICS}}


def segment_states(tracker: Tracker, plan: ExperimentPlan) -> list[dict[str, Any]]:
    """Every segment run of an online plan (the newest of each line's segment), in stream order; [] otherwise."""
    runs = tracker.runs(f"tags.`{RUN_TYPE}` = 'segment' and tags.`{PLAN_KEY}` = '{plan.key}'")
    newest: dict[tuple[str, int], Any] = {}
    for run in runs:
        key = (run.data.tags.get(LINE, ""), int(run.data.tags.get(SEGMENT, -1)))
        if key not in newest or (run.info.start_time or 0) > (newest[key].info.start_time or 0):
            newest[key] = run
    return [segment_row(newest[key]) for key in sorted(newest)]


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
