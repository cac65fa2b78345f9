"""The real image set (imagenette, read in place): prepare -> verify -> a short distant-class run on 2 workers.

Runs when STREAMSSL_REAL_DATA points at the ImageFolder tree (CI sets it); fails if it is set but missing.
Uses examples/imagenette.yaml with a CPU-sized budget (32 px, a few images per class, one epoch per chunk).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli.app import app
from orchestrator import tracking as tr
from orchestrator.shards import load_manifest, read_index

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
ROOT = Path(__file__).resolve().parents[2]


def test_prepare_and_run_distant_class_stream(real_data: Path, tmp_path: Path, ray_local) -> None:
    shards = tmp_path / "imagenette-shards"
    prepared = CliRunner().invoke(app, [
        "data", "prepare", str(real_data), str(shards),
        "--groups", str(ROOT / "examples" / "imagenette-groups.json"), "--max-per-class", "48",
    ])
    assert prepared.exit_code == 0, prepared.output
    manifest = load_manifest(str(shards))
    assert len(manifest.classes) == 10 and len(manifest.groups) == 4
    assert manifest.splits["train"].rows == 480
    index = read_index(str(shards), "train")
    assert sorted(set(index.column("label").to_pylist())) == list(range(10))
    verified = CliRunner().invoke(app, ["data", "verify", str(shards)])
    assert verified.exit_code == 0, verified.output

    spec = yaml.safe_load((ROOT / "examples" / "imagenette.yaml").read_text())
    spec["data"]["url"] = str(shards)
    spec["storage"] = {"workdir": str(tmp_path / "runs")}
    path = tmp_path / "imagenette.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, [
        "run", str(path), "--set", "data.image_size=32", "--set", "backbone.width=8",
        "--set", "optim.epochs_per_chunk=1", "--set", "optim.batch_size=16", "--set", "eval.linear_epochs=5",
    ])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imagenette-distant")
    chunks = client.search_runs([exp.experiment_id], f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    assert len(chunks) == 2 * 4 and all(r.info.status == "FINISHED" for r in chunks)
    assert all(0 <= r.data.metrics["knn_top1"] <= 1 for r in chunks)
    plan = client.search_runs([exp.experiment_id], f"tags.`{tr.RUN_TYPE}` = 'plan'")[0]
    assert plan.data.tags[tr.TAG + "stream_kind"] == "distant_class"
    assert "simclr.knn.st_jt_gap" in plan.data.metrics
