"""`streamssl submit SPEC --address http://HEAD:8265`: run a spec on a Ray cluster through the Jobs API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import console, err_console, exits_cleanly
from cli.options import Address, Sets, SpecArg, TrackingUri


@exits_cleanly
def submit(
    spec: Path = SpecArg,
    sets: list[str] = Sets,
    address: Optional[str] = Address,
    tracking_uri: Optional[str] = TrackingUri,
    env: list[str] = typer.Option(
        [], "--env", help="Name of an environment variable to pass to the job (its value is read here), e.g. "
                          "--env AWS_ACCESS_KEY_ID. Repeatable."),
    pip: list[str] = typer.Option(
        [], "--pip", help="Extra pip requirement installed in the job's environment. Repeatable. Not needed when "
                          "the cluster's image has streamssl's dependencies (cluster/Dockerfile)."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id. Default: streamssl-<spec>-<time>."),
    resume: bool = typer.Option(False, "--resume", help="The job continues the newest run of the same plan."),
    wait: bool = typer.Option(False, "--wait", help="Stream the job's logs until it ends; exit 6 if it failed."),
) -> None:
    """Validate SPEC here, then submit it as a Ray job (code + resolved spec as the working dir); prints the job id."""
    from orchestrator.errors import ClusterError
    from orchestrator.jobs import cluster_warnings, dashboard_address, job_info, job_logs, submit_spec
    from orchestrator.spec.experiment import load_spec

    address = dashboard_address(address)
    overrides = list(sets) + ([f"tracking.uri={tracking_uri}"] if tracking_uri else [])
    loaded = load_spec(spec, overrides)
    for warning in cluster_warnings(loaded):
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    submitted = submit_spec(loaded, address, job_id=job_id, env_names=env, pip=pip, resume=resume)
    console.print(submitted, highlight=False)
    if wait:
        for text in job_logs(address, submitted, follow=True):
            console.out(text, end="", highlight=False)
        info = job_info(address, submitted)
        console.print(f"job {submitted}: {info.status}", highlight=False)
        if info.status != "SUCCEEDED":
            raise ClusterError(f"job {submitted} ended {info.status}: {info.message}")
