"""`streamssl status SPEC`: every job of the spec's plan and the state of its newest MLflow run.
`streamssl status --job ID`: the state of a Ray job submitted with `streamssl submit`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import Address, Sets, TrackingUri


@exits_cleanly
def status(
    spec: Optional[Path] = typer.Argument(None, help="Experiment spec (YAML); not needed with --job."),
    sets: list[str] = Sets,
    tracking_uri: Optional[str] = TrackingUri,
    job: Optional[str] = typer.Option(None, "--job", help="A job id from `streamssl submit`: show that job instead."),
    address: Optional[str] = Address,
) -> None:
    """List the plan's jobs (line x chunk) with FINISHED / RUNNING / FAILED / PENDING, or one submitted job.
    An online plan also lists its segments (stream batches, checkpoint, accuracy, deadline misses, skipped shards)."""
    if job:
        return _job_status(job, address)
    if spec is None:
        raise typer.BadParameter("give a SPEC, or --job ID for a submitted job", param_hint="SPEC")
    from evaluators.report import results_table
    from orchestrator.lineage import job_states, segment_states
    from orchestrator.plan.planner import build_plan
    from orchestrator.spec.experiment import load_spec
    from orchestrator.tracking.tracker import Tracker

    overrides = list(sets) + ([f"tracking.uri={tracking_uri}"] if tracking_uri else [])
    loaded = load_spec(spec, overrides)
    if loaded.sweep is not None:
        return _sweep_status(spec, overrides, loaded)
    plan = build_plan(loaded)
    tracker = Tracker(loaded.tracking_uri, loaded.experiment_name)
    rows = job_states(tracker, plan)
    console.print(results_table(rows, ["job", "key", "state", "run", "knn_top1", "linear_top1"],
                                title=f"{loaded.name}: plan {plan.key}"))
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if loaded.stream.kind == "online":  # each line is one job over the stream: its segments say how far it got
        segments = segment_states(tracker, plan)
        counts = ["late_batches", "dropped_steps", *(["skipped_shards"] if loaded.online.source else [])]
        for row in segments:
            row["final"] = "yes" if row["final"] else ""
            row["run"] = row.pop("segment_run")
            row.update({k: None if row[k] is None else int(row[k]) for k in counts})
        scores = [f"{n}_top1" for n in loaded.eval.every_chunk if f"{n}_top1" in ("knn_top1", "linear_top1")]
        console.print(results_table(segments, ["line", "segment", "batches", "state", "final", *scores, *counts,
                                               "run"], title=f"online segments ({len(segments)})"))


def _sweep_status(path: Path, overrides: list[str], loaded) -> None:
    """A spec with a sweep section: its newest sweep, one row per trial."""
    from evaluators.report import results_table
    from orchestrator.lineage import newest_sweep, sweep_rows
    from orchestrator.spec.experiment import read_raw
    from orchestrator.tracking.tracker import Tracker

    tracker = Tracker(loaded.tracking_uri, loaded.experiment_name)
    run = newest_sweep(tracker, read_raw(path, overrides), str(path))
    metric = loaded.sweep.metric
    if run is None:
        console.print(f"{loaded.name}: no sweep of this spec recorded yet (`streamssl sweep {path}` runs one)")
        return
    rows = sweep_rows(tracker, run.info.run_id, metric)
    console.print(results_table(rows, ["trial", "state", "values", metric, "chunks", "run"],
                                title=f"{loaded.name}: sweep run {run.info.run_id} [{run.info.status}]"))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    planned = loaded.sweep.trial_count
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" of {planned} trials"
                  + (f"; best: {run.data.tags['streamssl.best_spec']}" if "streamssl.best_spec" in run.data.tags else ""))


def _job_status(job_id: str, address: Optional[str]) -> None:
    from orchestrator.jobs import job_info

    info = job_info(address, job_id)
    when = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"  # noqa: E731
    elapsed = ((info.end_time or time.time()) - info.start_time) if info.start_time else None
    console.print(f"job {info.job_id}: [bold]{info.status}[/]", highlight=False)
    console.print(f"  started {when(info.start_time)}, ended {when(info.end_time)}"
                  + (f", {elapsed:.0f} s" if elapsed is not None else ""), highlight=False)
    if info.message:
        console.print(f"  {info.message}", highlight=False)
