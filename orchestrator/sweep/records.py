"""A sweep's lineage in MLflow: the tags that tie sweep -> trials -> plans, and what a sweep has recorded so far.

A sweep run (`RUN_TYPE` "sweep", keyed by `SWEEP_KEY`) is the MLflow parent of one trial run per trial ("trial",
`TRIAL` = its index, `VALUES` = its sampled values as JSON, also its params); each trial run is the parent of the
plan run its driver opened, whose chunk and evaluation runs sit under it as in `streamssl run`. A trial ends
FINISHED, FAILED (with its `ERROR`), or KILLED with `STOPPED` saying when the scheduler stopped it. A trial left
RUNNING belongs to a sweep driver that died: `--resume` deletes it (and what is under it) and runs it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.tracking import lineage as tr

SWEEP_KEY = tr.TAG + "sweep_key"
SWEEP_RUN = tr.TAG + "sweep_run"
TRIAL = tr.TAG + "trial"
TUNE_TRIAL = tr.TAG + "tune_trial_id"
VALUES = tr.TAG + "trial_values"
ERROR = tr.TAG + "error"
PLAN_RUN = tr.TAG + "plan_run"
STOPPED = tr.TAG + "stopped_early"
BEST = tr.TAG + "best"  # "true" on the best trial run
BEST_TRIAL = tr.TAG + "best_trial"  # on the sweep run: the best trial's run id
BEST_SPEC = tr.TAG + "best_spec"  # on the sweep run: where the best trial's spec was written
# Keys of what a trial reports to Tune beside its metrics.
RESULT_RUN = "trial_run"
RESULT_TRIAL = "trial_index"


def trial_name(index: int) -> str:
    return f"trial-{index:03d}"


def value_params(values: dict[str, Any]) -> dict[str, str]:
    """Sampled values as MLflow params, written as `flatten` writes the same fields (lists as JSON), so a trial
    run's params and its plan run's line up."""
    return {path: json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for path, value in values.items()}


@dataclass
class TrialRecord:
    index: int
    run_id: str
    state: str  # finished | stopped | failed | interrupted
    values: dict[str, Any]
    history: list[tuple[int, float]] = field(default_factory=list)  # (chunk, metric)
    error: str | None = None
    plan_run: str | None = None

    @property
    def final(self) -> float | None:
        return self.history[-1][1] if self.history else None


def _state(run) -> str:
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED":
        return "finished"
    if status == "KILLED" and STOPPED in tags:
        return "stopped"
    if status == "RUNNING":
        return "interrupted"
    return "failed"


def read_trials(tracker, sweep_run: str, metric: str) -> list[TrialRecord]:
    """Every trial run of the sweep, by index (the newest run of an index when there are several)."""
    runs = sorted(tracker.children(sweep_run, "trial"), key=lambda r: r.info.start_time or 0)
    by_index: dict[int, TrialRecord] = {}
    for run in runs:
        tags = run.data.tags
        history = sorted((int(m.step), float(m.value))
                         for m in tracker.client.get_metric_history(run.info.run_id, metric))
        by_index[int(tags[TRIAL])] = TrialRecord(
            int(tags[TRIAL]), run.info.run_id, _state(run), json.loads(tags.get(VALUES, "{}")), history,
            tags.get(ERROR), tags.get(PLAN_RUN))
    return [by_index[i] for i in sorted(by_index)]


def _plan_runs(tracker, trial_run: str) -> list:
    return tracker.children(trial_run, "plan")


def mark_stopped(tracker, trial_run: str, reason: str) -> None:
    """A trial the scheduler stopped: it, its plan run and whatever was still open under that, KILLED."""
    for plan in _plan_runs(tracker, trial_run):
        for run in tracker.children(plan.info.run_id):
            if run.info.status == "RUNNING":
                tracker.end_run(run.info.run_id, "KILLED")
        tracker.set_tags(plan.info.run_id, {STOPPED: reason})
        if plan.info.status == "RUNNING":
            tracker.end_run(plan.info.run_id, "KILLED")
        tracker.set_tags(trial_run, {PLAN_RUN: plan.info.run_id})
    tracker.set_tags(trial_run, {STOPPED: reason})
    tracker.end_run(trial_run, "KILLED")


def delete_trial(tracker, trial_run: str) -> int:
    """Soft-delete a trial run and every run under it (an interrupted trial, about to run again)."""
    doomed = [trial_run]
    for plan in _plan_runs(tracker, trial_run):
        doomed.append(plan.info.run_id)
        doomed.extend(run.info.run_id for run in tracker.children(plan.info.run_id))
    tracker.delete_runs(doomed)
    return len(doomed)


__all__ = ["BEST", "BEST_SPEC", "BEST_TRIAL", "ERROR", "PLAN_RUN", "STOPPED", "SWEEP_KEY", "SWEEP_RUN", "TRIAL",
           "TrialRecord", "delete_trial", "mark_stopped", "read_trials", "trial_name", "value_params"]
