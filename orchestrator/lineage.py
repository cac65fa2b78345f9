"""Reading the record back by its lineage tags (`streamssl lineage`, `streamssl status`): it sits above everything
it reads (tracking's schema, sweep records, specs), so nothing below imports it.

    chain = lineage_dict(tracker, run_id)        # plan -> chunk run -> checkpoint -> eval runs, from any link
    rows = job_states(tracker, plan)             # one row per job: FINISHED / RUNNING / FAILED / PENDING
    rows = segment_states(tracker, plan)         # online plans: one row per segment run
    sweep_lineage(tracker, sweep_or_trial_run)   # sweep -> trials -> plans -> chunks -> evals, as data, for --json
    sweep_rows(tracker, raw, "sweep.yaml")       # one row per trial of the spec's newest sweep, for status
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.spec.experiment import validate_spec
from orchestrator.sweep import records as rec
from orchestrator.sweep.paths import resolve_paths
from orchestrator.sweep.space import with_values
from orchestrator.tracking import tags as tr

if TYPE_CHECKING:
    from orchestrator.plan.planner import ExperimentPlan
    from orchestrator.tracking.tracker import Tracker


def _plan_chain(tracker, plan_run: str) -> dict[str, Any]:
    chunks = []
    for chunk in sorted(tracker.children(plan_run, "chunk"),
                        key=lambda r: (r.data.tags.get(tr.LINE, ""), int(r.data.tags.get(tr.CHUNK, 0)))):
        chunks.append({"chunk": chunk.info.run_id, "line": chunk.data.tags.get(tr.LINE),
                       "index": int(chunk.data.tags.get(tr.CHUNK, 0)), "status": chunk.info.status,
                       "checkpoint_uri": chunk.data.tags.get(tr.CHECKPOINT),
                       "model_id": chunk.data.tags.get(tr.MODEL_ID),
                       "evals": [e.info.run_id for e in tracker.evaluation_of(chunk.info.run_id)]})
    return {"plan": plan_run, "chunks": chunks}


def _trial(tracker, record: rec.TrialRecord) -> dict[str, Any]:
    plans = tracker.children(record.run_id, "plan")
    return {"trial": rec.trial_name(record.index), "run": record.run_id, "state": record.state,
            "values": record.values, "final": record.final, "error": record.error,
            "plans": [_plan_chain(tracker, p.info.run_id) for p in plans]}


def sweep_lineage(tracker, run_id: str) -> dict[str, Any]:
    """The chain under a sweep run (every trial, its plan, chunks and evaluations), or a trial run's own."""
    run = tracker.get_run(run_id)
    tags = run.data.tags
    if tags.get(tr.RUN_TYPE) == "trial":
        sweep = tracker.get_run(tags[rec.SWEEP_RUN])
        metric = sweep.data.tags.get(tr.TAG + "sweep.metric", "knn_top1")
        record = next(t for t in rec.read_trials(tracker, sweep.info.run_id, metric) if t.run_id == run_id)
        return {"run_type": "trial", "sweep": sweep.info.run_id, **_trial(tracker, record)}
    metric = tags.get(tr.TAG + "sweep.metric", "knn_top1")
    trials = rec.read_trials(tracker, run_id, metric)
    return {"run_type": "sweep", "sweep": run_id, "status": run.info.status, "metric": metric,
            "mode": tags.get(tr.TAG + "sweep.mode"), "best_trial": tags.get(rec.BEST_TRIAL),
            "best_spec": tags.get(rec.BEST_SPEC), "trials": [_trial(tracker, t) for t in trials]}


def sweep_of(tracker, plan_run) -> dict[str, str]:
    """For a plan run a trial opened: {'sweep': id, 'trial': trial run id}; {} for a plan of `streamssl run`."""
    tags = plan_run.data.tags
    if rec.SWEEP_RUN not in tags:
        return {}
    return {"sweep": tags[rec.SWEEP_RUN], "trial": tags.get(tr.PARENT, "")}


def sweep_rows(tracker, sweep_run: str, metric: str) -> list[dict[str, Any]]:
    rows = []
    for record in rec.read_trials(tracker, sweep_run, metric):
        chunks = [c for p in tracker.children(record.run_id, "plan") for c in tracker.children(p.info.run_id, "chunk")]
        rows.append({"trial": rec.trial_name(record.index), "state": record.state,
                     "values": ", ".join(f"{k}={v}" for k, v in record.values.items()),
                     metric: "-" if record.final is None else f"{record.final:.4f}",
                     "chunks": f"{sum(c.info.status == 'FINISHED' for c in chunks)}", "run": record.run_id})
    return rows


def newest_sweep(tracker, raw: dict[str, Any], source: str):
    """The newest sweep run of the spec's sweep (same base spec and sweep section), or None."""
    raw = resolve_paths(raw)  # as `streamssl sweep` keyed it: its paths against the working directory
    spec = validate_spec(raw, source)
    key = rec.sweep_key(validate_spec(with_values(raw, {}), source), spec.sweep)
    runs = tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'sweep' and tags.`{rec.SWEEP_KEY}` = '{key}'")
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def lineage_dict(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """The chain of any streamssl run, as data: {'plan': id, 'chunk': id|None, 'checkpoint_uri': ..., 'model_id': ...,
    'evals': [...]}."""
    run = tracker.get_run(run_id)
    kind = run.data.tags.get(tr.RUN_TYPE)
    if kind in ("sweep", "trial"):  # sweep -> trials -> plans -> chunks -> evaluations
        return sweep_lineage(tracker, run_id)
    out: dict[str, Any] = {"run_type": kind}
    if kind == "segment":
        return {**out, **segment_row(run), "plan": run.data.tags.get(tr.PARENT)}
    chunk = run if kind == "chunk" else None
    if kind == "eval":
        chunk = tracker.get_run(run.data.tags[tr.EVALUATES])
    if chunk is not None:
        out["chunk"] = chunk.info.run_id
        out["checkpoint_uri"] = chunk.data.tags.get(tr.CHECKPOINT)
        out["model_id"] = chunk.data.tags.get(tr.MODEL_ID)
        out["plan"] = chunk.data.tags.get(tr.PARENT)
        out["evals"] = [e.info.run_id for e in tracker.evaluation_of(chunk.info.run_id)]
        if out["plan"]:
            segments = [s for s in segment_runs(tracker, out["plan"])
                        if s.data.tags.get(tr.ONLINE_RUN) == chunk.info.run_id]
            if segments:
                out["segments"] = [segment_row(s) for s in segments]
    else:
        out["plan"] = run_id
        out["chunks"] = [r.info.run_id for r in tracker.children(run_id, "chunk")]
        segments = segment_runs(tracker, run_id)
        if segments:
            out["segments"] = [segment_row(s) for s in segments]
    plan = run if out["plan"] == run_id else tracker.get_run(out["plan"])
    out.update(sweep_of(tracker, plan))  # a sweep trial's plan: where it sits in the sweep
    return out


def segment_runs(tracker: Tracker, plan_run: str) -> list:
    runs = tracker.children(plan_run, "segment")
    return sorted(runs, key=lambda r: (r.data.tags.get(tr.LINE, ""), int(r.data.tags.get(tr.SEGMENT, -1))))


def segment_row(run: Any) -> dict[str, Any]:
    """A segment run as data: its stream batches, checkpoint (and LoggedModel), evaluation numbers and state."""
    tags, metrics = run.data.tags, run.data.metrics
    return {"segment_run": run.info.run_id, "line": tags.get(tr.LINE), "segment": int(tags.get(tr.SEGMENT, -1)),
            "batches": tags.get(tr.TAG + "stream_batches"), "state": run.info.status,
            "final": tags.get(tr.FINAL_SEGMENT) == "true", "online_run": tags.get(tr.ONLINE_RUN),
            "checkpoint_uri": tags.get(tr.CHECKPOINT), "model_id": tags.get(tr.MODEL_ID),
            **{k: metrics.get(k) for k in tr.SEGMENT_METRICS}}


def segment_states(tracker: Tracker, plan: ExperimentPlan) -> list[dict[str, Any]]:
    """Every segment run of an online plan (the newest of each line's segment), in stream order; [] otherwise."""
    runs = tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'segment' and tags.`{tr.PLAN_KEY}` = '{plan.key}'")
    newest: dict[tuple[str, int], Any] = {}
    for run in runs:
        key = (run.data.tags.get(tr.LINE, ""), int(run.data.tags.get(tr.SEGMENT, -1)))
        if key not in newest or (run.info.start_time or 0) > (newest[key].info.start_time or 0):
            newest[key] = run
    return [segment_row(newest[key]) for key in sorted(newest)]


def job_states(tracker: Tracker, plan: ExperimentPlan) -> list[dict[str, Any]]:
    """Every job of the plan with the state of its newest chunk run (PENDING when it has none)."""
    runs = tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'chunk' and tags.`{tr.PLAN_KEY}` = '{plan.key}'")
    newest: dict[str, Any] = {}
    for run in runs:
        key = run.data.tags.get(tr.JOB_KEY)
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


__all__ = ["job_states", "lineage_dict", "newest_sweep", "segment_row", "segment_runs", "segment_states",
           "sweep_lineage", "sweep_of", "sweep_rows"]
