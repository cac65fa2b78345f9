"""`streamssl ui`: the MLflow UI on the same tracking store, bound to 127.0.0.1, at the runs table."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import webbrowser
from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import TrackingUri, resolve_tracking_uri
from orchestrator.errors import TrackingError

# The query that opens MLflow's model-training view of an experiment (Runs, Models, Model registry).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


@exits_cleanly
def ui(
    tracking_uri: Optional[str] = TrackingUri,
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Open this experiment's runs table."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address; change it only to share the UI on purpose."),
    port: int = typer.Option(5000, "--port", help="Port of the UI."),
    open_browser: bool = typer.Option(True, "--open/--no-open", help="Open the runs table in a browser."),
) -> None:
    """Start `mlflow ui` on the streamssl tracking store (Ctrl-C stops it)."""
    from orchestrator.tracking.tracker import Tracker

    uri = resolve_tracking_uri(tracking_uri)
    tracker = Tracker(uri)
    url = f"http://{host}:{port}/"
    if experiment:
        found = tracker.client.get_experiment_by_name(experiment)
        if found is None:
            raise TrackingError(f"experiment {experiment!r} not found in {uri}")
        # MLflow 3 lands on a GenAI overview; the runs table is its own route, and without the workflow type
        # MLflow 3.17 shows its GenAI side bar (traces, judges, prompts) instead of Runs and Models.
        url += f"#/experiments/{found.experiment_id}/runs?{MODEL_TRAINING_VIEW}"
    # One worker is plenty for one person browsing runs (mlflow's default starts four).
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", "1"]
    server = subprocess.Popen(command)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        if server.poll() is not None:
            raise TrackingError(f"mlflow ui exited with code {server.returncode} (port {port} in use?)")
        console.print(f"MLflow UI: {url}  (Ctrl-C to stop)", highlight=False, soft_wrap=True)
        sys.stdout.flush()
        if open_browser:
            webbrowser.open(url)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a server that does not wind down is not left behind
                server.kill()
                server.wait()
