"""`streamssl status SPEC`: every job of the spec's plan and the state of its newest MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cli.common import console, exits_cleanly
from cli.options import Sets, SpecArg, TrackingUri


@exits_cleanly
def status(spec: Path = SpecArg, sets: list[str] = Sets, tracking_uri: Optional[str] = TrackingUri) -> None:
    """List the plan's jobs (line x chunk) with FINISHED / RUNNING / FAILED / PENDING."""
    from evaluators.report import results_table
    from orchestrator.lineage import job_states
    from orchestrator.planner import build_plan
    from orchestrator.spec import load_spec
    from orchestrator.tracking import Tracker

    overrides = list(sets) + ([f"tracking.uri={tracking_uri}"] if tracking_uri else [])
    loaded = load_spec(spec, overrides)
    plan = build_plan(loaded, progress=False)
    tracker = Tracker(loaded.tracking_uri, loaded.experiment_name)
    rows = job_states(tracker, plan)
    console.print(results_table(rows, ["job", "key", "state", "run", "knn_top1", "linear_top1"],
                                title=f"{loaded.name}: plan {plan.key}"))
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
