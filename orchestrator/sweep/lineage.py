"""Reading a sweep back: `streamssl lineage` and `streamssl status` walk sweep -> trials -> plans -> chunks -> evals.

    sweep_lineage(tracker, sweep_or_trial_run)   # as data, for --json
    sweep_rows(tracker, raw, "sweep.yaml")       # one row per trial of the spec's newest sweep, for status
"""

from __future__ import annotations

from typing import Any

from orchestrator.sweep import records as rec
from orchestrator.tracking import lineage as tr


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
    from orchestrator.spec.experiment import validate_spec
    from orchestrator.sweep.driver import sweep_key
    from orchestrator.sweep.space import with_values

    from orchestrator.sweep.paths import resolve_paths

    raw = resolve_paths(raw)  # as `streamssl sweep` keyed it: its paths against the working directory
    spec = validate_spec(raw, source)
    key = sweep_key(validate_spec(with_values(raw, {}), source), spec.sweep)
    runs = tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'sweep' and tags.`{rec.SWEEP_KEY}` = '{key}'")
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None
__all__ = ["newest_sweep", "sweep_lineage", "sweep_of", "sweep_rows"]
