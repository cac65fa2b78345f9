"""`streamssl sweep SPEC`: search the spec's `sweep:` space with Ray Tune, each trial a full `streamssl run`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import Sets, SpecArg, TrackingUri


@exits_cleanly
def sweep(
    spec: Path = SpecArg,
    sets: list[str] = Sets,
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue the newest sweep of the same spec: recorded trials (finished, stopped or failed) are not run "
             "again; a trial the interrupted driver left running is removed and run again.",
    ),
    best_spec: Optional[Path] = typer.Option(
        None, "--best-spec", help="Where to write the best trial's spec (default: "
                                  "<workdir>/sweeps/<name>-<key>/best_spec.yaml)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster to use (ray://HEAD:10001 or auto). Default: start a local Ray."),
    tracking_uri: Optional[str] = TrackingUri,
) -> None:
    """Run a hyperparameter sweep: trials on Ray Tune (random, grid or Optuna; ASHA), nested runs in MLflow."""
    from orchestrator.spec.experiment import read_raw
    from orchestrator.sweep.driver import run_sweep

    overrides = list(sets) + ([f"tracking.uri={tracking_uri}"] if tracking_uri else [])
    run_sweep(read_raw(spec, overrides), str(spec), resume=resume, address=address, console=console,
              best_spec_path=best_spec)
