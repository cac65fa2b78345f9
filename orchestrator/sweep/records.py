"""A sweep's lineage in MLflow: the tags that tie sweep -> trials -> plans, and what a sweep has recorded so far.

A sweep run (`RUN_TYPE` "sweep", keyed by `SWEEP_KEY`) is the MLflow parent of one trial run per trial ("trial",
`TRIAL` = its index, `VALUES` = its sampled values as JSON, also its params); each trial run is the parent of the
plan run its driver opened, whose chunk and evaluation runs sit under it as in `streamssl run`. A trial ends
FINISHED, FAILED (with its `ERROR`), or KILLED with `STOPPED` saying when the scheduler stopped it. A trial left
RUNNING belongs to a sweep driver that died: `--resume` deletes it (and what is under it) and runs it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.spec.params import identity_digest
from orchestrator.tracking import tags as tr

if TYPE_CHECKING:
    from orchestrator.spec.experiment import Spec
    from orchestrator.spec.sweep import SweepSpec

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


EVAL_RUN = tr.TAG + "eval_run"  # on a chunk run: its evaluation run (orchestrator.run.experiment.link_eval)
ENDED_BY = tr.TAG + "ended_by"  # on a run the sweep ended for a trial that could not: why


def unevaluated_chunks(tracker, plan_run: str) -> list:
    """The plan's FINISHED chunk runs with a checkpoint but no evaluation run: chunks logged while the evaluation
    of an earlier one was still out when the trial stopped. (An online segment run stays RUNNING until its
    evaluation lands, so `close_plan` ends it with the open runs.)"""
    out = []
    for run in tracker.children(plan_run):
        tags = run.data.tags
        if run.info.status != "FINISHED" or tags.get(tr.RUN_TYPE) != "chunk":  # (a segment ends at its evaluation)
            continue
        if EVAL_RUN in tags or tracker.evaluation_of(run.info.run_id):
            continue
        out.append(run)
    return out


def close_plan(tracker, plan_run: str, status: str, reason: str, unevaluated: bool = True) -> list[str]:
    """End what a trial that can no longer write left open under its plan run: every RUNNING run (chunk, eval,
    segment) and the plan run itself `status` with `ENDED_BY` = reason, and every finished chunk run whose
    evaluation never came KILLED with the reason (its checkpoint stays; the lineage says why no metrics follow;
    not with `unevaluated=False`: a trial that failed by itself keeps them for `streamssl run --resume`).
    Returns the ids of the runs it ended."""
    ended = []
    for run in tracker.children(plan_run):
        if run.info.status == "RUNNING":
            tracker.set_tags(run.info.run_id, {ENDED_BY: reason})
            tracker.end_run(run.info.run_id, status)
            ended.append(run.info.run_id)
    for run in unevaluated_chunks(tracker, plan_run) if unevaluated else []:
        tracker.set_tags(run.info.run_id, {ENDED_BY: f"{reason}; its checkpoint was never evaluated",
                                           STOPPED: reason})
        tracker.end_run(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    if tracker.get_run(plan_run).info.status == "RUNNING":
        tracker.set_tags(plan_run, {ENDED_BY: reason})
        tracker.end_run(plan_run, status)
        ended.append(plan_run)
    return ended


def mark_stopped(tracker, trial_run: str, reason: str) -> None:
    """A trial the scheduler stopped: it, its plan run and whatever was still open under that, KILLED; a chunk it
    logged whose evaluation was still out, KILLED with the reason."""
    for plan in _plan_runs(tracker, trial_run):
        tracker.set_tags(plan.info.run_id, {STOPPED: reason})
        close_plan(tracker, plan.info.run_id, "KILLED", reason)
        tracker.set_tags(trial_run, {PLAN_RUN: plan.info.run_id})
    tracker.set_tags(trial_run, {STOPPED: reason})
    if tracker.get_run(trial_run).info.status != "KILLED":
        tracker.end_run(trial_run, "KILLED")


def mark_dead(tracker, trial_run: str, reason: str) -> None:
    """A trial whose actor died without a word: the trial run FAILED with `ERROR`, its plan's open runs KILLED."""
    for plan in _plan_runs(tracker, trial_run):
        close_plan(tracker, plan.info.run_id, "KILLED", reason)
        tracker.set_tags(trial_run, {PLAN_RUN: plan.info.run_id})
    if tracker.get_run(trial_run).info.status == "RUNNING":
        tracker.set_tags(trial_run, {ERROR: reason})
        tracker.end_run(trial_run, "FAILED")


def delete_trial(tracker, trial_run: str) -> int:
    """Soft-delete a trial run and every run under it (an interrupted trial, about to run again)."""
    doomed = [trial_run]
    for plan in _plan_runs(tracker, trial_run):
        doomed.append(plan.info.run_id)
        doomed.extend(run.info.run_id for run in tracker.children(plan.info.run_id))
    tracker.delete_runs(doomed)
    return len(doomed)


def sweep_key(base: Spec, sweep: SweepSpec) -> str:
    """Same base spec (by identity) and same sweep section: the same sweep (what `--resume` continues)."""
    payload = {"base": identity_digest(base), "sweep": sweep.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["BEST", "BEST_SPEC", "BEST_TRIAL", "ERROR", "PLAN_RUN", "STOPPED", "SWEEP_KEY", "SWEEP_RUN", "TRIAL",
           "TrialRecord", "close_plan", "delete_trial", "mark_dead", "mark_stopped", "read_trials", "trial_name",
           "unevaluated_chunks", "value_params", "sweep_key"]
