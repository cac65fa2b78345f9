"""`streamssl lineage RUN_ID`: the chain data -> chunk run -> checkpoint -> evaluation runs, from any link."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import TrackingUri, resolve_tracking_uri


@exits_cleanly
def lineage(
    run_id: str = typer.Argument(..., help="Any streamssl MLflow run: plan, chunk or evaluation run."),
    tracking_uri: Optional[str] = TrackingUri,
    as_json: bool = typer.Option(False, "--json", help="Print the chain as JSON (for scripts)."),
) -> None:
    """Walk a run's lineage: down from a plan run, or up from a chunk or evaluation run."""
    from cli.render import lineage_tree
    from orchestrator.lineage import lineage_dict
    from orchestrator.tracking.tracker import Tracker

    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    if as_json:
        console.print_json(json.dumps(lineage_dict(tracker, run_id)))
    else:
        console.print(lineage_tree(tracker, run_id))
