"""One sweep trial, inside its Ray Tune actor: the trial's spec run by the same driver as `streamssl run`.

The trial is an MLflow run (`trial-003`, nested under the sweep's run, its sampled values as params); the plan run
the driver opens is nested under it, with the plan's chunk (or segment) and evaluation runs under that. After every
chunk the mean headline metrics over the spec's lines go to Tune (`tune.report`), which is what ASHA judges; when
ASHA stops the trial, Tune ends the report with SystemExit and the driver unwinds with `TrialStopped`, leaving
the runs for the sweep driver to mark stopped (this actor may be killed at any moment after that).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import flatten
from orchestrator.spec.sweep import SweepSpec
from orchestrator.sweep import records as rec
from orchestrator.sweep.paths import resolve_values
from orchestrator.sweep.space import decode, trial_spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from orchestrator.train.hooks import DriverHooks, TrialStopped


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep shares (sent to the trial actors once, with `tune.with_parameters`)."""

    raw: dict[str, Any]  # the spec as written, overrides applied
    source: str
    sweep: SweepSpec
    sweep_run: str
    tracking_uri: str
    experiment: str
    artifact_root: str | None
    points: list[dict[str, Any]] | None  # random / grid: every trial's values by index; optuna: None
    counter: Any = None  # optuna: the actor handing out trial indices
    base_dir: str | None = None  # the user's working directory, which `raw`'s paths are resolved against


def trial_values(context: TrialContext, config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import ray

    if context.points is not None:
        index = int(config["trial"])
        return index, context.points[index]
    return int(ray.get(context.counter.next.remote())), decode(context.sweep, config)


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune's function trainable (bound with `tune.with_parameters(run_trial, context=...)`)."""
    from ray import tune

    index, values = trial_values(context, config)
    name = rec.trial_name(index)
    # (Tune runs this in a working directory of its own: sampled paths resolve against the user's, as the spec's did)
    spec = trial_spec(context.raw, resolve_values(values, context.base_dir) if context.base_dir else values,
                      context.source)
    tracker = Tracker(context.tracking_uri, context.experiment, context.artifact_root)
    trial_id = tune.get_context().get_trial_id()
    run_id = tracker.create_run(name, {
        tr.RUN_TYPE: "trial", tr.PARENT: context.sweep_run, rec.SWEEP_RUN: context.sweep_run,
        rec.TRIAL: str(index), rec.TUNE_TRIAL: trial_id, rec.VALUES: json.dumps(values, sort_keys=True),
        tr.TAG + "spec_name": spec.name,
    })
    # The whole trial spec as params (as a plan run has them), so trials line up field by field in the compare view.
    tracker.log_params(run_id, {**flatten(spec), **rec.value_params(values), "trial": str(index)})

    last: dict[str, Any] = {}

    def report(chunk: int, metrics: dict[str, float], final: bool) -> None:
        tracker.log_metrics(run_id, metrics, step=chunk)
        last.update({**metrics, "chunk": chunk, rec.RESULT_RUN: run_id, rec.RESULT_TRIAL: index})
        if final:  # reported once the runs are ended: a stop now (ASHA at max_t) must not cut the record short
            return
        try:
            tune.report(dict(last))
        except SystemExit:  # Tune stopped this trial (ASHA): unwind the driver without marking anything FAILED
            raise TrialStopped(f"{name} stopped after chunk {chunk}") from None

    hooks = DriverHooks(parent_tags={tr.PARENT: run_id, rec.SWEEP_RUN: context.sweep_run, rec.TRIAL: str(index)},
                        run_prefix=f"{name}/", on_score=report)
    started = time.time()
    try:
        summary = run_experiment(spec, console=Console(file=io.StringIO(), width=120), hooks=hooks)
    except TrialStopped:
        return  # (the sweep driver marks the runs; nothing more may be written from here)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        tracker.set_tags(run_id, {rec.ERROR: message[:5000]})
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.set_tags(run_id, {rec.PLAN_RUN: summary.parent_run_id or ""})
    tracker.log_metrics(run_id, {"trial_seconds": time.time() - started})
    tracker.end_run(run_id, "FINISHED")
    if last:
        try:
            tune.report(dict(last))
        except SystemExit:  # (a stop decision on the last report changes nothing)
            pass


class TrialCounter:
    """Hands out trial indices to Optuna's trials (Tune's own ids are random), starting after the logged ones."""

    def __init__(self, start: int):
        self.value = start

    def next(self) -> int:
        self.value += 1
        return self.value - 1


__all__ = ["TrialContext", "TrialCounter", "run_trial"]
