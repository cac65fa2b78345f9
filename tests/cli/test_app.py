"""Every command answers --help; bad input exits with its own code and a message naming what is wrong; `ui`
serves the MLflow UI on loopback at the runs table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from tests.orchestrator.s3_server import free_port

COMMANDS = [["run"], ["eval"], ["submit"], ["status"], ["logs"], ["lineage"], ["report"], ["ui"], ["data"], ["data", "synth"], ["data", "prepare"], ["data", "verify"],
            ["data", "synth-detection"], ["data", "prepare-detection"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = {"name": "t", "data": {"url": str(tmp_path / "nothing-here")},
            "stream": {"kind": "instance", "chunks": 2}, "lines": {"method": ["simclr"], "strategy": ["joint"]},
            "storage": {"workdir": str(tmp_path / "runs")}}
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_spec_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = write_spec(tmp_path, optim={"lr": -1, "momentun": 0.9})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "optim.lr" in result.output and "optim.momentun" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # stopped before anything was written


def test_bad_override_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(write_spec(tmp_path)), "--set", "stream.chunks=many"])
    assert result.exit_code == 2 and "stream.chunks" in result.output


def test_missing_data_exits_3_naming_the_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(write_spec(tmp_path)), "--dry-run"])
    assert result.exit_code == 3
    assert "nothing-here" in result.output


def test_dry_run_lists_jobs_without_training(tmp_path: Path, synthetic_url: str) -> None:
    path = write_spec(tmp_path, data={"url": synthetic_url}, stream={"kind": "distant_class", "chunks": 3})
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("PENDING") == 3 and "simclr-joint/chunk-2" in result.output
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing: no store, no checkpoints


def test_a_dry_run_names_the_synthetic_set_it_would_make_and_makes_nothing(tmp_path: Path) -> None:
    path = write_spec(tmp_path, data={"url": str(tmp_path / "synthetic"), "synthetic": {"train": 60, "val": 20}})
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code != 0 and "not generated yet" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "synthetic").exists() and not (tmp_path / "runs").exists()


def test_unreachable_tracking_server_exits_5_before_training(tmp_path: Path, synthetic_url: str) -> None:
    path = write_spec(tmp_path, data={"url": synthetic_url})
    env_before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        result = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = env_before
    assert result.exit_code == 5, result.output
    assert "cannot be reached" in result.output


def test_submit_without_a_cluster_exits_6_naming_the_address(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["submit", str(spec)])
    assert result.exit_code == 6 and "RAY_ADDRESS" in result.output
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 6 and f"http://127.0.0.1:{port}" in result.output
    result = CliRunner().invoke(app, ["logs", "some-job", "--address", "ray://127.0.0.1:10001"])
    assert result.exit_code == 6 and "Jobs API" in result.output


def test_submit_warns_about_local_paths_before_contacting_the_cluster(tmp_path: Path) -> None:
    from orchestrator.jobs import cluster_warnings, stage
    from orchestrator.spec.experiment import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml")
    warnings = cluster_warnings(spec)
    assert [w.split("=")[0].split(" ")[0] for w in warnings] == ["data.url", "storage.checkpoints", "tracking.uri"]
    remote = load_spec(Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml", [
        "data.url=s3://bucket/data", "storage.checkpoints=s3://bucket/ckpt", "tracking.uri=http://mlflow:5000",
        "data.storage_options={key: AKIA, secret: hush}"])
    assert cluster_warnings(remote) == []
    # The staged working dir holds the packages and the spec as validated, secrets included (the job needs them).
    staged = stage(remote, tmp_path)
    assert (staged / "cli" / "app.py").is_file() and (staged / "orchestrator" / "jobs.py").is_file()
    assert not list(staged.rglob("__pycache__"))
    assert load_spec(staged / "spec.yaml").data.storage_options["secret"] == "hush"


def test_status_needs_a_spec_or_a_job() -> None:
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "--job" in result.output
