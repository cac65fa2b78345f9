"""`streamssl run`'s entry point: materialise the data, plan, pick the driver for the plan's stream, run it.

    summary = run_experiment(load_spec("examples/quickstart.yaml"))
    run_experiment(spec, dry=True)     # prints the plan; writes nothing (no data step, no runs)
"""

from __future__ import annotations

import time

from rich.console import Console

from orchestrator.data.materialise import materialise
from orchestrator.errors import IncompleteRecordError, TrainingError
from orchestrator.plan.planner import build_plan
from orchestrator.run.base import Driver, artifact_root
from orchestrator.run.display import dry_run, print_summary
from orchestrator.run.experiment import ChunkedDriver
from orchestrator.run.online import OnlineDriver
from orchestrator.run.summary import ExperimentSummary
from orchestrator.spec.experiment import Spec
from orchestrator.tracking.tracker import Tracker
from orchestrator.train.hooks import DriverHooks


def existing_store(spec: Spec) -> Tracker | None:
    """The spec's tracking store to read from, or None when it is the embedded default and not made yet."""
    if spec.tracking.uri is None and not (spec.workdir / "mlflow.db").is_file():
        return None
    return Tracker(spec.tracking_uri)


def run_experiment(
    spec: Spec,
    resume: bool = False,
    dry: bool = False,
    address: str | None = None,
    console: Console | None = None,
    hooks: DriverHooks | None = None,
) -> ExperimentSummary:
    """`hooks` (a sweep trial's): tags of the plan run, a prefix of every run name, the per-chunk scores."""
    console = console or Console()
    started = time.time()
    if not dry:  # the run's data step; planning below only reads, and a dry run writes nothing
        materialise(spec)
    plan = build_plan(spec)
    if dry:  # what earlier attempts finished, read from a store that exists (none is created)
        dry_run(plan, console, existing_store(spec))
        return ExperimentSummary(None, plan.key)
    tracker = Tracker(spec.tracking_uri, spec.experiment_name, artifact_root(spec))
    tracker.name_prefix = hooks.run_prefix if hooks else ""
    # An online plan is one long job per line group, with segments instead of chunks.
    driver_class: type[Driver] = OnlineDriver if spec.stream.kind == "online" else ChunkedDriver
    driver = driver_class(plan, tracker, console, address, hooks)
    try:
        summary = driver.run(resume)
    finally:
        driver.stop_services()
    print_summary(summary, console, spec)
    if summary.diverged:
        finished = len(plan.lines) - len(summary.diverged)
        raise TrainingError("; ".join(f"training of {line} {message}" for line, message in summary.diverged.items())
                            + f" — the other {finished} line(s) of plan run {summary.parent_run_id} ran to the end")
    if summary.missing:
        raise IncompleteRecordError(
            f"plan run {summary.parent_run_id} is incomplete ({len(summary.missing)} line(s) lack runs, listed "
            "above); `streamssl run SPEC --resume` trains, logs and evaluates what is missing")
    console.print(f"done in {time.time() - started:.0f} s — parent run {summary.parent_run_id}; "
                  f"`streamssl ui` shows it; `streamssl lineage {summary.parent_run_id}` walks it")
    return summary

