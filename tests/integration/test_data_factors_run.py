"""Data factors through the real driver: a supervised line on coarse labels (the manifest's 6 groups, with a 6-way
head that the 12 class ids would overflow) trained on half of each chunk's classes for as many steps as the full
chunks would take."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.plan.planner import build_plan
from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from tests.specs import tiny_spec


@pytest.mark.slow
def test_half_the_classes_on_group_labels_trains_the_full_steps(tmp_path: Path, synthetic_url: str, ray_local) -> None:
    spec = validate_spec(tiny_spec(
        "factors", synthetic_url,
        data={"url": synthetic_url, "image_size": 16, "class_fraction": 0.5, "labels": "group"},
        stream={"kind": "random_class", "chunks": 2, "seed": 0},
        lines={"method": ["supervised"], "strategy": ["sequential"]},
        methods={"supervised": {"num_classes": 6}},
        optim={"epochs_per_chunk": 1, "batch_size": 32}, eval={"every_chunk": ["knn"], "baseline": False},
        storage={"workdir": str(tmp_path / "runs")},
    ))
    plan = build_plan(spec)
    run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    chunks = {r.data.tags[tr.CHUNK]: r.data.metrics
              for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")}
    for c, chunk in enumerate(plan.stream.chunks):
        m = chunks[str(c)]
        assert chunk.rows < chunk.unsampled_rows  # classes were dropped ...
        assert m["training_rows"] == chunk.rows
        assert m["steps"] == chunk.unsampled_rows // 32  # ... but the chunk trained the full chunk's steps
        assert m["samples"] == m["steps"] * 32
    evals = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'eval'")
    assert len(evals) == 2 and all(0 <= e.data.metrics["knn_top1"] <= 1 for e in evals)
