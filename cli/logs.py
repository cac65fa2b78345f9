"""`streamssl logs JOB_ID`: the output of a job submitted with `streamssl submit`."""

from __future__ import annotations

from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import Address


@exits_cleanly
def logs(
    job_id: str = typer.Argument(..., help="Job id printed by `streamssl submit`."),
    address: Optional[str] = Address,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """Print the job's driver output (the `streamssl run` it started on the cluster)."""
    from orchestrator.jobs import job_logs

    for text in job_logs(address, job_id, follow=follow):
        console.out(text, end="", highlight=False)
