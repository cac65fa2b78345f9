"""`streamssl run SPEC`: pre-train every line of the spec over its stream, evaluate each chunk, log the lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import Sets, SpecArg, TrackingUri


@exits_cleanly
def run(
    spec: Path = SpecArg,
    sets: list[str] = Sets,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the spec, build the plan and list its jobs; write nothing (no data, no runs)."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue the newest run of the same plan: finished jobs are skipped, runs a dead driver left "
             "RUNNING are marked FAILED, and a chunk cut short restarts from its latest checkpoint.",
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster to use (ray://HEAD:10001 or auto). Default: start a local Ray."),
    tracking_uri: Optional[str] = TrackingUri,
) -> None:
    """Run an experiment spec end to end (on the embedded default unless told otherwise)."""
    from orchestrator.run.launch import run_experiment
    from orchestrator.spec.experiment import load_spec

    overrides = list(sets)
    if tracking_uri:
        overrides.append(f"tracking.uri={tracking_uri}")
    loaded = load_spec(spec, overrides)
    run_experiment(loaded, resume=resume, dry=dry_run, address=address, console=console)
