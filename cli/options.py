"""Options several commands share, so their names and help read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEFAULT_WORKDIR = "streamssl-runs"

TrackingUri = typer.Option(
    None, "--tracking-uri",
    help="MLflow tracking URI. Default: the spec's tracking.uri, else sqlite:///streamssl-runs/mlflow.db "
         "(the embedded default). Point it at an `mlflow server` to share runs.",
)
SpecArg = typer.Argument(..., exists=False, help="Experiment spec (YAML), e.g. examples/quickstart.yaml.")
Address = typer.Option(
    None, "--address",
    help="Ray Jobs API of the cluster, http://HEAD:8265 (default: $RAY_ADDRESS).",
)
Sets = typer.Option(
    [], "--set", "-s",
    help="Override a spec field: --set optim.lr=0.1 --set stream.chunks=5 (values are read as YAML).",
)


def resolve_tracking_uri(tracking_uri: Optional[str]) -> str:
    """`--tracking-uri` when given, else the embedded default (sqlite:///streamssl-runs/mlflow.db)."""
    if tracking_uri:
        return tracking_uri
    return f"sqlite:///{(Path(DEFAULT_WORKDIR) / 'mlflow.db').resolve()}"
